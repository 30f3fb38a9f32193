"""`infllava evaluate` end to end on a tiny random converted checkpoint."""

import json
import os

import pytest

from infllava_jax.checkpoints import converted
from infllava_jax.data import synthetic as synthetic_data
from infllava_jax.evaluate import cli, synthetic
from infllava_jax.inference import Assistant
from tests.evaluate import bench_files
from tests.random_params import random_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config):
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  converted.save_converted(path, tiny_config.model,
                               random_params(tiny_config.model, std=0.05, unit_scales=False))
  return path


def _outputs(out):
  lines = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"))]
  with open(os.path.join(out, "summary.json")) as f:
    return lines, json.load(f)


def test_scienceqa_through_the_cli(checkpoint, tmp_path, capsys):
  data = bench_files.write_scienceqa(tmp_path / "sqa")
  out = str(tmp_path / "out")
  assert cli.main(["--checkpoint", checkpoint, "--benchmark", "scienceqa", "--data", data,
                   "--batch-size", "2", "--max-new-tokens", "2", "--out", out]) == 0
  lines, summary = _outputs(out)
  assert [l["id"] for l in lines] == ["5", "11"]
  assert all(isinstance(l["output"], str) and l["answer"] in "AB" for l in lines)
  assert summary["benchmark"] == "scienceqa" and summary["records"] == 2
  assert summary["step"] is None  # a converted checkpoint: no training step
  assert set(summary["by_category"]) == {"natural science", "social science"}
  assert summary["accuracy"] == sum(l["correct"] for l in lines) / 2
  assert json.loads(capsys.readouterr().out) == summary

  # A second run into the same folder is refused before the model loads; --overwrite
  # replaces the first run's files.
  again = ["--checkpoint", checkpoint, "--benchmark", "scienceqa", "--data", data,
           "--batch-size", "2", "--max-new-tokens", "2", "--out", out, "--limit", "1",
           "--dtype", "bfloat16"]
  with pytest.raises(SystemExit) as refused:
    cli.main(again)
  assert refused.value.code == 2
  assert (f"--out {out!r} already holds predictions.jsonl and summary.json from an earlier "
          "run") in capsys.readouterr().err
  assert _outputs(out) == (lines, summary)
  assert summary["dtype"] == "float32"  # the checkpoint's model.dtype (configs/tiny.py)
  assert cli.main(again + ["--overwrite"]) == 0
  lines, summary = _outputs(out)
  assert [l["id"] for l in lines] == ["5"] and summary["dtype"] == "bfloat16"


def test_processor_size_flag(checkpoint, tmp_path, capsys):
  data = bench_files.write_scienceqa(tmp_path / "sqa")
  runs = {}
  for size in (None, 84):
    out = str(tmp_path / f"out{size}")
    flags = ["--processor-size", str(size)] if size else []
    assert cli.main(["--checkpoint", checkpoint, "--benchmark", "scienceqa", "--data", data,
                     "--max-new-tokens", "2", "--out", out, "--no-progress"] + flags) == 0
    runs[size] = _outputs(out)
  assert runs[None][1]["processor_size"] == 252 and runs[84][1]["processor_size"] == 84
  assert [l["id"] for l in runs[84][0]] == [l["id"] for l in runs[None][0]]


def test_mmbench_limit_keeps_every_shift(checkpoint, tmp_path):
  data = bench_files.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
  out = str(tmp_path / "out")
  assert cli.main(["--checkpoint", checkpoint, "--benchmark", "mmbench", "--data", data,
                   "--limit", "1", "--batch-size", "3", "--max-new-tokens", "2",
                   "--out", out, "--no-progress"]) == 0
  lines, summary = _outputs(out)
  assert [(l["id"], l["shift"]) for l in lines] == [
      ("0", 0), ("1000000", 1), ("2000000", 2), ("3000000", 3)]
  assert summary["records"] == 4 and summary["questions"] == 1
  assert summary["accuracy"] == float(all(l["correct"] for l in lines))
  assert summary["vanilla"]["accuracy"] == float(lines[0]["correct"])


def test_bad_record_stops_before_the_model_loads(checkpoint, tmp_path, capsys):
  columns = [c for c in bench_files.MMBENCH_COLUMNS if c != "category"]
  data = bench_files.write_mmbench(tmp_path / "bad.tsv", columns=columns)
  assert cli.main(["--checkpoint", checkpoint, "--benchmark", "mmbench", "--data", data,
                   "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "bad.tsv: missing column(s) ['category']" in err and "loaded" not in err
  with pytest.raises(SystemExit):
    cli.main(["--checkpoint", checkpoint, "--benchmark", "pope"])  # --data required


def test_synthetic_through_the_cli_matches_heldout_accuracy(checkpoint, tmp_path, tiny_config):
  out = str(tmp_path / "out")
  assert cli.main(["--checkpoint", checkpoint, "--benchmark", "synthetic", "--limit", "3",
                   "--batch-size", "2", "--max-new-tokens", "2", "--out", out]) == 0
  lines, summary = _outputs(out)
  assert [l["id"] for l in lines] == [f"synth-pattern-heldout-0-{i:07d}" for i in range(3)]
  assert summary["records"] == 3 and set(summary["by_category"]) <= set(synthetic_data.KINDS)
  # The training loop's entry point gives the same numbers from the same answers.
  assistant = Assistant.from_run(checkpoint)
  config = assistant.config.copy_and_resolve_references()
  config.eval = {"heldout_examples": 3, "max_new_tokens": 2}
  result = synthetic.heldout_accuracy(assistant.params, config, batch_size=2, progress=False)
  assert result == {"accuracy": summary["accuracy"], "examples": 3,
                    "by_kind": summary["by_category"]}


def test_each_benchmark_reads_its_data_flags(tmp_path):
  """--data / --images / --limit reach every reader (no model needed)."""
  sqa = bench_files.write_scienceqa(tmp_path / "sqa")
  pope_dir, coco = bench_files.write_pope(tmp_path / "pope")
  seed_dir = bench_files.write_seed(tmp_path / "seed")
  mmb = bench_files.write_mmbench(tmp_path / "mmb.tsv")
  ckpt = str(tmp_path)  # only has to exist for argument checks
  def ids(*flags):
    args = cli.parse_args(["--checkpoint", ckpt, *flags])
    return [q.id for q in cli.read_questions(args)]
  assert ids("--benchmark", "scienceqa", "--data", sqa, "--limit", "1") == ["5"]
  assert ids("--benchmark", "pope", "--data", pope_dir, "--images", coco) == [
      "adversarial/1", "adversarial/2", "random/1"]
  assert ids("--benchmark", "seed", "--data", seed_dir) == ["101669_0", "3"]
  assert ids("--benchmark", "mmbench", "--data", mmb, "--no-circular") == ["0", "7"]
  assert len(ids("--benchmark", "mmbench", "--data", mmb)) == 7
