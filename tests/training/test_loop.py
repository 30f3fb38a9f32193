"""The training loop: learning, exact resume, preemption, kill -9, non-finite stop, 2 processes.

In-process runs use one CPU device (the cheapest compile); the sharded maths is checked in
test_step.py. Subprocess runs go through the `infllava train` CLI.
"""

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from infllava_jax import sharding
from infllava_jax.config import load_config
from infllava_jax.checkpoints import run as checkpoint
from infllava_jax.training import loop
from infllava_jax.training import cli as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config.model.vision.depth=1", "--config.model.llm.depth=1",
        "--config.data.synthetic.num_train=48", "--config.data.batch_size=4",
        "--config.data.read_threads=1", "--config.train.lr=3e-3",
        "--config.train.warmup_ratio=0.0", "--config.train.log_every=1",
        "--config.eval.heldout_examples=0", "--config.checkpoint.async_save=false"]
# The speed figures are missing from the first step's line: it is timed apart (compiling).
PROGRESS = re.compile(r"step (\d+)/(\d+) loss (\S+) lr (\S+) grad_norm \S+"
                      r"(?: tokens/s [\d,]+ step_time [\d.]+s MFU (\S+))? samples")


def make_trainer(workdir, overrides=(), devices=None):
  config = load_config("configs/synthetic.py", TINY + list(overrides))
  return loop.Trainer(config, str(workdir), devices=jax.devices()[:1] if devices is None
                      else devices)


def host(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} read straight from the TFRecord event files tensorboardX wrote."""
  from tensorboardX.proto import event_pb2
  out: dict[str, dict[int, float]] = {}
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_batch_not_dividing_the_mesh_names_the_numbers(tmp_path):
  with pytest.raises(ValueError, match=r"global batch 4 .*grad_accum_steps=1.*"
                                       r"data x fsdp = 8 x 1 = 8 batch shards"):
    make_trainer(tmp_path, ["--config.mesh=data=8"], devices=jax.devices())
  # The batch is split as the rules place it: here over `tensor` alone.
  mesh = sharding.make_mesh("fsdp=4,tensor=2")
  loop.check_divisible(4, mesh, 2, (("batch", "tensor"),))
  with pytest.raises(ValueError, match=r"micro-batches over tensor = 2 = 2 batch shards"):
    loop.check_divisible(4, mesh, 4, (("batch", "tensor"),))


def test_total_steps_of_the_stage_recipes():
  # docs/fidelity.md#recipe-numbers: 558,128 / 256 -> 2,180 steps; 665,298 / 128 -> 5,198 (the modality-grouped
  # epoch ends on a partly empty batch, as the reference's ends on a short one).
  stage1 = load_config("configs/infllava_8b_stage1.py")
  stage2 = load_config("configs/infllava_8b_stage2.py")
  assert loop.total_steps(stage1, 558128, 256) == 2180
  assert loop.total_steps(stage2, 665298, 128) == 5198
  stage2.train.steps = 10
  assert loop.total_steps(stage2, 665298, 128) == 10


def test_loss_falls_resume_is_bitwise_and_metrics_are_logged(tmp_path, capsys):
  """2N steps straight vs N steps, a new Trainer on the same folder, N more: equal bits.

  The second half must see the same batches, so this also checks that the grain iterator
  state saved with step N puts the data exactly where it was.
  """
  n = 12
  overrides = [f"--config.train.steps={2 * n}", f"--config.checkpoint.every_steps={n}"]
  straight = make_trainer(tmp_path / "straight", overrides)
  history = []
  straight.run(on_metrics=lambda step, metrics: history.append((step, metrics["loss"])))
  out = capsys.readouterr().out
  progress = [m for m in map(PROGRESS.search, out.splitlines()) if m]
  assert [int(m.group(1)) for m in progress] == list(range(1, 2 * n + 1))
  assert re.search(r"step 1 took [\d.]+s \(the step compiles on its first call\)", out)
  assert progress[0].group(5) is None
  assert all(m.group(5) == "n/a" for m in progress[1:])  # no peak FLOP/s known for CPU
  losses = [float(m.group(3)) for m in progress]
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert last < first - 0.5, f"loss did not fall: {losses}"

  scalars = tensorboard_scalars(tmp_path / "straight" / "tensorboard")
  assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens",
          "train/tokens_per_s"} <= set(scalars)
  assert sorted(scalars["train/loss"]) == list(range(1, 2 * n + 1))
  np.testing.assert_allclose([scalars["train/loss"][s] for s in range(1, 2 * n + 1)], losses,
                             atol=1e-4)
  assert [s for s, _ in history] == list(range(1, 2 * n + 1))  # every step, in order
  np.testing.assert_allclose([loss for _, loss in history], losses, atol=1e-4)

  first_half = make_trainer(tmp_path / "resumed", overrides)
  first_half.run(until_step=n)
  assert first_half.checkpointer.latest_step() == n
  second_half = make_trainer(tmp_path / "resumed", overrides)
  assert second_half.start_step == n and int(second_half.state.step) == n
  second_half.run()
  assert int(second_half.state.step) == int(straight.state.step) == 2 * n
  assert_trees_equal(host(second_half.state.params), host(straight.state.params))
  assert_trees_equal(host(second_half.state.opt_state), host(straight.state.opt_state))
  assert second_half.data.counts == straight.data.counts

  # One Trainer run twice goes on from where its first run() stopped.
  again = make_trainer(tmp_path / "again", overrides)
  again.run(until_step=n)
  again.run()
  assert int(again.state.step) == 2 * n and list(again.checkpointer.all_steps()) == [n, 2 * n]
  assert_trees_equal(host(again.state.params), host(straight.state.params))


def test_cli_stops_on_a_non_finite_loss_with_one_line(tmp_path, capsys):
  flags = [t for t in TINY if not t.startswith(("--config.train.lr=", "--config.data.batch"))]
  assert train_cli.main(["--config", "configs/synthetic.py", "--workdir", str(tmp_path),
                         "--config.train.steps=4", "--config.train.lr=1e38",
                         "--config.data.batch_size=8"] + flags) == 1  # a row per device
  err = capsys.readouterr().err
  assert re.fullmatch(r"infllava train: error: (loss|grad_norm) is (nan|inf) at step \d; "
                      r"stopping without saving it\. .*\n", err), err


def test_training_imports_no_evaluation_and_the_cli_reports_heldout_accuracy(tmp_path,
                                                                            capsys):
  code = ("import sys, infllava_jax.training.loop; "
          "print([m for m in sys.modules if m.startswith('infllava_jax.evaluate')])")
  imported = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(1),
                            capture_output=True, text=True, check=True).stdout
  assert imported.strip() == "[]"
  flags = [t for t in TINY if not t.startswith(("--config.eval.", "--config.data.batch"))]
  assert train_cli.main(["--config", "configs/synthetic.py", "--workdir", str(tmp_path),
                         "--config.train.steps=2", "--config.data.batch_size=8",  # a row per device
                         "--config.eval.heldout_examples=2",
                         "--config.eval.max_new_tokens=2"] + flags) == 0
  out = capsys.readouterr().out
  assert re.search(r"step 2/2 loss .*\n.*held-out accuracy \d\.\d{3} on 2 examples "
                   r"\(infllava\)\n", out), out


class NaNAt:
  """The trainer's data iterator, with NaN pixels from the `step`-th batch on."""

  def __init__(self, data, step):
    self._data, self._step, self._served = data, step, 0
    self.grain_iterator = data.grain_iterator

  def __next__(self):
    batch = next(self._data)
    self._served += 1
    if self._served >= self._step:
      batch = {**batch, "pixels": np.full_like(batch["pixels"], np.nan)}
    return batch

  @property
  def counts(self):
    return self._data.counts


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  t = make_trainer(tmp_path, ["--config.train.steps=20", "--config.checkpoint.every_steps=2"])
  t.data = NaNAt(t.data, 5)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.NonFiniteLossError, match=r"loss is nan at step 5"):
    t.run()
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's SIGTERM handler is gone
  steps = t.checkpointer.all_steps()
  assert max(steps) == 4, steps
  resumed = make_trainer(tmp_path, ["--config.train.steps=20",
                                    "--config.checkpoint.every_steps=2"])
  assert resumed.start_step == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(resumed.state.params)))

  # A save that fails while the run winds down: the error surfaces, the handler is restored.
  def failed_write():
    raise OSError("disk full")

  resumed.checkpointer.wait_until_finished = failed_write
  with pytest.raises(OSError, match="disk full"):
    resumed.run(until_step=5)
  assert signal.getsignal(signal.SIGTERM) is handler


def cli_env(devices: int) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def start_train(workdir, overrides, devices=1, extra=()):
  cmd = [sys.executable, "-m", "infllava_jax.cli", "train", "--config", "configs/synthetic.py",
         "--workdir", str(workdir), *extra, *TINY, *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=cli_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def read_until(proc, pattern, timeout, seen):
  """Appends `proc`'s output lines to `seen` until one matches `pattern`; returns the match."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    seen.append(line)
    match = re.search(pattern, line)
    if match:
      return match
  proc.kill()
  raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n"
                       + "".join(seen[-40:]))


def test_sigterm_saves_and_exits_0_then_kill_9_resumes_from_last_complete(tmp_path):
  overrides = ["--config.train.steps=10000", "--config.checkpoint.every_steps=3",
               "--config.checkpoint.async_save=true"]
  seen = []
  proc = start_train(tmp_path, overrides)
  read_until(proc, r"step 5/10000", 300, seen)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  seen.append(out)
  assert proc.returncode == 0, "".join(seen)
  saved = int(re.search(r"preempted \(SIGTERM\): saved step (\d+), exiting", out).group(1))
  assert saved >= 5
  assert checkpoint.Checkpointer(tmp_path / "checkpoints",
                                     load_config("configs/synthetic.py").checkpoint
                                     ).latest_step() == saved

  seen = []
  proc = start_train(tmp_path, overrides)
  read_until(proc, rf"resumed from step {saved} ", 300, seen)
  read_until(proc, rf"step {saved + 1}/10000", 120, seen)
  # Stop it hard while it saves every 3 steps: a step cut short must never be restored.
  read_until(proc, rf"step {saved + 7}/10000", 120, seen)
  proc.kill()
  proc.wait(timeout=60)
  # Saves were started at each multiple of 3 after `saved`; the newest may have been cut
  # short (async), so the restart takes the newest complete one.
  restarted = make_trainer(tmp_path, overrides)
  assert saved < restarted.start_step <= saved + 7 and restarted.start_step % 3 == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(restarted.state.params)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 1 CPU device x 2 rows vs 1 process x 2 devices x 4 rows.

  Host i feeds rows i, i+2, ... of the shuffled order, so each global batch holds the same
  rows as the 1-process batch, in another order (host 0's rows first): the sums over rows
  and the gradient all-reduce then add in another order, so equality is to 1e-5, not bits.
  """
  k = 4
  overrides = [f"--config.train.steps={k}", "--config.checkpoint.every_steps=100",
               "--config.mesh=data"]
  port = free_port()
  procs = [start_train(tmp_path / "two", overrides + ["--config.data.batch_size=2"], 1,
                       ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", str(i)]) for i in range(2)]
  outs = []
  for proc in procs:
    try:
      outs.append(proc.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for i, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out}"
  assert f"step {k}/{k}" in outs[0] and "global batch 4" in outs[0], outs[0]

  one = make_trainer(tmp_path / "one", overrides, devices=jax.devices()[:2])
  one.run()
  abstract = one.setup.abstract
  two = checkpoint.Checkpointer(tmp_path / "two" / "checkpoints", one.config.checkpoint)
  assert two.latest_step() == k
  restored = two.restore(abstract.params, abstract.opt_state).params
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(host(restored))[0],
                          jax.tree.leaves(host(one.state.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
