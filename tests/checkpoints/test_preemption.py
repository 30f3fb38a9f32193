"""Stopping on SIGTERM: one process (a signal handler) and several (JAX's preemption service)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from infllava_jax.presets import _sections
from infllava_jax.checkpoints import preemption, run
from tests.checkpoints.test_run import REPO, run_script


def test_sigterm_sets_flag_and_loop_saves_before_exit(tmp_path):
  proc = run_script(tmp_path, """
      import sys, time
      import jax.numpy as jnp
      from infllava_jax.checkpoints import preemption, run
      from infllava_jax.presets import _sections
      flag = preemption.PreemptionFlag()
      ckpt = run.Checkpointer(sys.argv[1], _sections.checkpoint_config())
      step = 0
      print("ready", flush=True)
      while not flag.should_stop(step):
        step += 1
        time.sleep(0.01)
      ckpt.save(step, {"w": jnp.full((3,), float(step))}, {"count": jnp.int32(step)},
                force=True)
      ckpt.close()
      print("saved", step, flag.signal, flush=True)
      """)
  assert proc.stdout.readline().strip() == "ready"
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  _, step, signum = out.split()
  assert int(signum) == signal.SIGTERM and int(step) > 1
  ckpt = run.Checkpointer(tmp_path / "run", _sections.checkpoint_config())
  assert ckpt.latest_step() == int(step)
  ckpt.close()


def test_preemption_flag_restores_previous_handler():
  seen = []
  previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append("old"))
  try:
    flag = preemption.PreemptionFlag((signal.SIGUSR1,))
    assert not flag.should_stop(0)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.should_stop(1) and seen == []
    flag.restore()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == ["old"]
  finally:
    signal.signal(signal.SIGUSR1, previous)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
  """JAX's preemption service (no Python handler) tells both processes the same step."""
  script = tmp_path / "loop.py"
  script.write_text(textwrap.dedent("""
      import sys, time
      import jax
      jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
      import signal
      from infllava_jax.checkpoints import preemption
      flag = preemption.PreemptionFlag()
      assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # left to the service
      step = 0
      print("ready", flush=True)
      while not flag.should_stop(step):
        step += 1
        time.sleep(0.01)
      print("stop", step, flush=True)
      """))
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    for proc in procs:
      assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = [proc.communicate(timeout=60) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, (out, err) in zip(procs, outs):
    assert proc.returncode == 0, err
  steps = [int(out.split()[-1]) for out, _ in outs]
  assert steps[0] == steps[1] > 1
