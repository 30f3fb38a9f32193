"""bench/strategies.py in its reduced mode: one variant on the wide task (LLaVA JSON data, a
cropped held-out set) and an unknown variant skipped by name, in one subprocess."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reduced_run_writes_the_table_json_and_plot(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
  done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "strategies.py"),
                         "--reduced", "--out", str(tmp_path), "--variants", "s2,no_such",
                         "--tasks", "wide"], capture_output=True, text=True, timeout=600,
                        env={**env, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stdout + done.stderr
  assert "skipping no_such: this infllava_jax has no variant" in done.stdout
  report = json.loads((tmp_path / "strategies.json").read_text())
  assert report["steps"] == 4 and report["compile_8b_gib"] == {}
  s2 = report["results"]["wide"]["s2"]
  assert s2["visual_tokens"] == 36  # the tiny tower's 6 x 6 grid, whatever the scales
  assert 0 <= s2["accuracy"] <= 1 and s2["step_s"] > 0
  table = (tmp_path / "strategies.md").read_text()
  assert "| `s2`: S2 (3 scales) | 36 | 14 |" in table and "no_such" not in table
  assert report["clip_passes"] == {"s2": 14}
  assert (tmp_path / "strategies.png").stat().st_size > 1000
  with open(tmp_path / "data" / "wide" / "train.json") as f:
    records = json.load(f)
  assert len(records) == 4 * 8
  from PIL import Image
  assert Image.open(tmp_path / "data" / "wide" / "images" / records[0]["image"]).size == (252, 126)
