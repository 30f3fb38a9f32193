"""Damaged checkpoints, a changed config, two trainers on one workdir: what a user sees.

One tiny run is trained through the CLI (steps 2 and 4 saved) and copied per test; every
case runs an `infllava` command on it, as a user would, and checks its exit code and the
first line of its message. `train` runs in a subprocess (it owns the workdir while it runs);
the reading commands run in-process through the same entry point (`cli.main`).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from infllava_jax import cli
from infllava_jax.checkpoints import lock
from tests.training.test_loop import REPO, TINY, cli_env, read_until

# A vision tower of two layers: the release layout (convert to-pytorch) keeps the layer
# before the feature layer.
RUN = TINY + ["--config.train.steps=4", "--config.checkpoint.every_steps=2",
             "--config.model.vision.depth=2"]


def train(workdir, *flags, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "infllava_jax.cli", "train", "--config", "configs/synthetic.py",
       "--workdir", str(workdir), *RUN, *flags],
      cwd=REPO, env=cli_env(1), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  done = train(workdir)
  assert done.returncode == 0, done.stdout + done.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert not (workdir / lock.OWNER_FILE).exists()  # released at the end
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  """A fresh copy of the trained run."""
  return shutil.copytree(trained, tmp_path / "run")


def truncate_largest_param_shard(step_dir):
  """Cuts the largest data file of the step's params to 1000 bytes (a half-copied file)."""
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir / "params")
           for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(1000)


def errors(capsys) -> list[str]:
  return capsys.readouterr().err.strip().splitlines()


UNREADABLE_4 = re.compile(r"warning: \S+/checkpoints/4 is unreadable \(OUT_OF_RANGE: .*"
                          r"is not valid for value of size 1000\); using step 2 instead$")


def test_reading_commands_skip_a_damaged_newest_step_and_refuse_it_by_name(run, tmp_path,
                                                                           capsys):
  truncate_largest_param_shard(run / "checkpoints" / "4")
  image = tmp_path / "cat.png"
  from PIL import Image
  Image.new("RGB", (32, 32), "white").save(image)
  ask = ["--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "2"]

  assert cli.main(["generate", "--checkpoint", str(run), *ask]) == 0
  err = errors(capsys)
  assert UNREADABLE_4.match(err[0]), err
  assert os.path.isdir(run / "checkpoints" / "4")  # a reader leaves the step where it is

  assert cli.main(["generate", "--checkpoint", str(run), "--step", "4", *ask]) == 2
  err = errors(capsys)
  assert len(err) == 1 and re.match(
      r"infllava generate: error: \S+/checkpoints/4 is unreadable \(OUT_OF_RANGE: .*\); an "
      r"older step may read: --step 2$", err[0]), err

  assert cli.main(["evaluate", "--checkpoint", str(run), "--benchmark", "synthetic",
                   "--limit", "2", "--max-new-tokens", "2", "--no-progress",
                   "--out", str(tmp_path / "eval")]) == 0
  err = errors(capsys)
  assert UNREADABLE_4.match(err[0]), err
  assert '"step": 2' in (tmp_path / "eval" / "summary.json").read_text()

  assert cli.main(["convert", "to-pytorch", "--quiet", "--checkpoint", str(run),
                   "--out", str(tmp_path / "release")]) == 0
  err = errors(capsys)
  assert UNREADABLE_4.match(err[0]), err
  assert (tmp_path / "release" / "model.safetensors.index.json").is_file()


def test_inspect_lists_a_run_and_skips_a_step_whose_metadata_is_damaged(run, capsys):
  assert cli.main(["inspect", str(run), "--summary"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"{run}: training run, step 4\n")
  assert re.search(r"^llm/layers\s+[\d,]+$", out, re.M) and "total" in out
  assert cli.main(["inspect", str(run / "checkpoints" / "2"), "--grep", "embed"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"{run / 'checkpoints' / '2'}: training run, step 2\n")
  assert re.search(r"^llm/embed/embedding\s+\[512, 64\]\s+float32$", out, re.M), out

  (run / "checkpoints" / "4" / "params" / "_METADATA").write_text('{"tree_metadata": ')
  assert cli.main(["inspect", str(run), "--summary"]) == 0
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and re.match(r"warning: \S+/checkpoints/4 is unreadable \(.+\); using "
                                    r"step 2 instead$", err[0]), err
  assert captured.out.startswith(f"{run}: training run, step 2\n")


def test_train_sets_a_damaged_step_aside_and_resumes_from_the_one_before(run):
  truncate_largest_param_shard(run / "checkpoints" / "4")
  done = train(run, "--config.train.steps=6")
  assert done.returncode == 0, done.stdout + done.stderr
  warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
  assert len(warning) == 1 and re.match(
      r"warning: \S+/checkpoints/4 is unreadable \(OUT_OF_RANGE: .*\); moved to "
      r"4\.unreadable-out-of-range; using step 2 instead$", warning[0]), warning
  assert "resumed from step 2 " in done.stdout
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "4.unreadable-out-of-range", "6"]


def test_resume_with_another_model_shape_names_the_param_and_both_shapes(run):
  done = train(run, "--config.model.llm.mlp_dim=96")
  assert done.returncode == 2, done.stdout + done.stderr
  err = done.stderr.strip().splitlines()
  assert len(err) == 1 and re.match(
      r"infllava train: error: \S+/checkpoints/4: param llm/layers/mlp/down/kernel is saved "
      r"with shape \(1, 128, 64\) but the config's model has \(1, 96, 64\) \(and 2 more "
      r"params\): the config differs from the one that saved it$", err[0]), err
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]  # nothing set aside
  assert not (run / lock.OWNER_FILE).exists()


def test_a_second_trainer_on_a_workdir_refuses_at_once_and_leaves_the_first_running(run):
  first = subprocess.Popen(
      [sys.executable, "-m", "infllava_jax.cli", "train", "--config", "configs/synthetic.py",
       "--workdir", str(run), *RUN, "--config.train.steps=10000"],
      cwd=REPO, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  try:
    read_until(first, r"step 6/10000", 300, seen)
    start = time.monotonic()
    second = train(run, "--config.train.steps=10000", timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert time.monotonic() - start < 60  # refuses before building anything
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and re.match(
        rf"infllava train: error: {re.escape(str(run))} is in use by another training run "
        rf"\(host \S+, pid {first.pid}, started \S+, run id \w+; last heartbeat \d+s ago\)\. "
        rf"Wait for it to end, .* or remove {re.escape(str(run / lock.OWNER_FILE))}$",
        err[0]), err
    read_until(first, r"step 8/10000", 120, seen)  # the first goes on
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, "".join(seen) + out
    assert "preempted (SIGTERM): saved step" in out
  finally:
    first.kill()
  assert not (run / lock.OWNER_FILE).exists()
