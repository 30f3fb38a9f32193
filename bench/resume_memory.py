"""Peak host and device memory of a run's start: fresh vs resumed from a checkpoint.

Each start is its own subprocess (a process's peak RSS only grows): `fresh` builds a
`Trainer` in an empty workdir (random init and AdamW state, born sharded) and then saves
that state as step 1; `resume` builds a `Trainer` on the same workdir, which restores it.
Neither trains (the step is jitted, not compiled), so the two differ only in where the
state comes from. Printed per start: peak RSS up to the end of the Trainer's construction
(`resource.getrusage`); peak device memory (the device's `peak_bytes_in_use` where
`memory_stats()` has it, GPU/TPU; else the peak of the live jax arrays' buffers, sampled
every millisecond by a thread: XLA:CPU keeps no statistics); the state's own bytes. Exits
1 when the resume's peaks exceed the fresh start's by more than `--slack-mb`.

  python bench/resume_memory.py [--config configs/synthetic.py] [--config.a.b=v ...]

Results: docs/performance.md#resume-memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MB = 2 ** 20


def live_buffer_bytes() -> int:
  """Bytes of the device buffers the live jax arrays hold, each buffer counted once (Orbax
  assembles restored arrays from per-device arrays that share their buffers)."""
  import jax
  buffers = {}
  for x in jax.live_arrays():
    for shard in x.addressable_shards:
      buffers[shard.device.id, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
  return sum(buffers.values())


class PeakLiveBytes(threading.Thread):
  """Samples `live_buffer_bytes` until `stop()`; keeps the max."""

  def __init__(self, interval_s: float = 0.001):
    super().__init__(daemon=True)
    self.interval_s, self.peak, self._done = interval_s, 0, threading.Event()

  def run(self):
    while not self._done.is_set():
      self.peak = max(self.peak, live_buffer_bytes())
      time.sleep(self.interval_s)

  def stop(self) -> int:
    self._done.set()
    self.join()
    return self.peak


def child(mode: str, workdir: str, config_path: str, overrides: list[str]) -> dict:
  """Builds one Trainer (`mode` fresh or resume) and measures its start."""
  import jax
  from infllava_jax.config import load_config
  from infllava_jax.training import loop

  config = load_config(config_path, overrides)
  stats = jax.devices()[0].memory_stats()
  sampler = None if stats and "peak_bytes_in_use" in stats else PeakLiveBytes()
  if sampler:
    sampler.start()
  t0 = time.perf_counter()
  trainer = loop.Trainer(config, workdir)
  jax.block_until_ready(trainer.state)
  seconds = time.perf_counter() - t0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  device = (sampler.stop() if sampler else jax.devices()[0].memory_stats()["peak_bytes_in_use"])
  state = sum(s.data.nbytes for x in jax.tree.leaves(trainer.state)
              for s in x.addressable_shards)
  assert (mode == "resume") == (trainer.start_step > 0), (mode, trainer.start_step)
  if mode == "fresh":
    trainer.checkpointer.save(1, trainer.state.params, trainer.state.opt_state,
                              trainer.data.grain_iterator, force=True)
    trainer.checkpointer.wait_until_finished()
  return {"mode": mode, "seconds": seconds, "peak_rss": rss, "peak_device": device,
          "device_measure": "live arrays" if sampler else "peak_bytes_in_use",
          "state": state, "platform": jax.devices()[0].platform}


def run_child(mode: str, workdir: str, config_path: str, overrides: list[str]) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                        "--workdir", workdir, "--config", config_path, *overrides],
                       cwd=REPO, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{mode} start failed ({out.returncode}):\n{out.stdout}{out.stderr}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--slack-mb", type=float, default=8.0,
                      help="allowed excess of the resume's peaks over the fresh start's")
  parser.add_argument("--child", choices=("fresh", "resume"), help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  args, overrides = parser.parse_known_args(argv)
  overrides = ["--config.eval.heldout_examples=0", *overrides]
  if args.child:
    print(json.dumps(child(args.child, args.workdir, args.config, overrides)), flush=True)
    return 0
  with tempfile.TemporaryDirectory() as workdir:
    fresh = run_child("fresh", workdir, args.config, overrides)
    resume = run_child("resume", workdir, args.config, overrides)
  print(f"{args.config} {' '.join(overrides)}: state {fresh['state'] / MB:.1f} MiB on "
        f"{fresh['platform']} (device memory: {fresh['device_measure']})")
  for r in (fresh, resume):
    print(f"  {r['mode']:<6}  peak RSS {r['peak_rss'] / MB:8.1f} MiB  peak device "
          f"{r['peak_device'] / MB:8.1f} MiB  start {r['seconds']:.1f}s")
  worse = [k for k in ("peak_rss", "peak_device") if resume[k] > fresh[k] + args.slack_mb * MB]
  if worse:
    print(f"resume exceeds the fresh start's {', '.join(worse)} by more than "
          f"{args.slack_mb} MiB", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
