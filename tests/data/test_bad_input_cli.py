"""Bad data as a user meets it: `python -m infllava_jax.cli train` on the tiny config.

Records are checked before anything compiles (JAX_LOG_COMPILES=1 would log a compile), a
user error is one line on stderr and exit 2; with data.skip_bad_samples the run goes on.
"""

import json
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QA = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]
TEXT_QA = [{"from": "human", "value": "Is there a person?"}, {"from": "gpt", "value": "Yes."}]


def _train(tmp_path, records, *overrides, run="run"):
  (tmp_path / "data.json").write_text(json.dumps(records) if isinstance(records, list)
                                      else records)
  # One CPU device (not the test session's 8) and a log line for every compile.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_LOG_COMPILES": "1",
         "PYTHONPATH": REPO}
  argv = [sys.executable, "-m", "infllava_jax.cli", "train", "--config", "configs/synthetic.py",
          "--workdir", str(tmp_path / run), "--config.data.source=llava_json",
          f"--config.data.json_path={tmp_path / 'data.json'}",
          f"--config.data.image_folder={tmp_path}", "--config.data.batch_size=2",
          "--config.data.shuffle=False", "--config.train.steps=2",
          "--config.eval.heldout_examples=0", *overrides]
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _error_line(done) -> str:
  """The one line a user error prints; nothing compiled, no traceback."""
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr and "Compiling" not in done.stderr, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if line.startswith("infllava train:")]
  assert len(lines) == 1, done.stderr[-3000:]
  return lines[0]


def test_malformed_json_file(tmp_path):
  line = _error_line(_train(tmp_path, '[{"id": "a", "conversations": [}'))
  assert line.startswith(f"infllava train: error: {tmp_path / 'data.json'}: not valid JSON: ")
  assert line.endswith("(data.json_path)")


def test_bad_records_are_named_before_the_compile(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  records = [{"id": "good", "image": "ok.png", "conversations": QA},
             {"id": "no-conv", "image": "ok.png"},
             {"id": "roles", "conversations": [TEXT_QA[0], TEXT_QA[0]]},
             {"id": "good2", "conversations": TEXT_QA},
             {"id": "gone", "image": "missing/x.png", "conversations": QA},
             {"id": "gone2", "image": "y.png", "conversations": QA}]
  line = _error_line(_train(tmp_path, records))
  assert line == (
      f"infllava train: error: {tmp_path / 'data.json'}: 4 of 6 records are bad: "
      "record #1 (id 'no-conv'): malformed record: field 'conversations' missing; "
      "record #2 (id 'roles'): field 'conversations': roles do not alternate: turn 1 is "
      "'human', expected 'gpt'; "
      f"record #4 (id 'gone'): field 'image': image file {str(tmp_path / 'missing/x.png')!r} "
      "not found; 1 more (fix them, or set data.skip_bad_samples=True to skip them)")


def test_text_only_run_refuses_image_records_and_trains_on_text(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  text = [{"id": f"t{i}", "conversations": TEXT_QA} for i in range(4)]
  line = _error_line(_train(tmp_path, text + [{"id": "img", "image": "ok.png",
                                                "conversations": QA}],
                            "--config.data.max_images_per_row=0"))
  assert ("record #4 (id 'img'): field 'image': the record has an image but "
          "data.max_images_per_row=0 (a text-only run)") in line
  # The infllava variant trains the LLM alone (no vision work traced; before, the DEM
  # divided by zero images).
  done = _train(tmp_path, text, "--config.data.max_images_per_row=0",
                "--config.data.packing=True", run="text-only")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 2/2 loss" in done.stdout


def test_skip_bad_samples_counts_them_and_trains(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  good = {"id": "good", "image": "ok.png", "conversations": QA}
  records = [good, {"id": "gone", "image": "y.png", "conversations": QA}, good, good, good]
  done = _train(tmp_path, records, "--config.data.skip_bad_samples=True")
  assert done.returncode == 0, done.stderr[-3000:]
  assert (f"{tmp_path / 'data.json'}: 1 of 5 records are bad: record #1 (id 'gone'): field "
          "'image': image file") in done.stderr
  assert "(skipped: data.skip_bad_samples=True)" in done.stderr
  assert "step 2/2 loss" in done.stdout and "skipped 1" in done.stdout


def test_an_image_that_does_not_decode_is_one_line_too(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  good = {"id": "good", "image": "ok.png", "conversations": QA}
  corrupt = {"id": "corrupt", "image": "corrupt.png", "conversations": QA}
  # Found as it is read (the metadata pass does not decode images).
  done = _train(tmp_path, [good, corrupt, good, good])
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith(
      f"infllava train: error: {tmp_path / 'data.json'}: record 'corrupt': field 'image': "
      "cannot decode image")
