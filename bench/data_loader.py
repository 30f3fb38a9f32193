"""Input pipeline throughput beside the train step's consumption, in one run.

    python bench/data_loader.py [--config configs/synthetic.py[:arg]] [--batches N]
                                [--config.data.worker_count=2 ...]

Prints samples/s of the grain pipeline on the config's data (default: the synthetic set)
and samples/s the real train step consumes on the same config, and their ratio (goal >= 3x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Runnable as a plain script from a checkout (the package need not be installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infllava_jax.config import load_config  # noqa: E402
from infllava_jax.data import pipeline  # noqa: E402


def pipeline_samples_per_s(config, batches: int) -> float:
  """Samples/s out of the pipeline, after one warm-up batch (worker start-up excluded)."""
  it = pipeline.make_iterator(config, process_index=0, process_count=1)
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  return batches * config.data.batch_size / elapsed


def train_step_samples_per_s(config, batches: int) -> float:
  """Samples/s the jit-compiled train step consumes on this config (one fixed batch).

  The step is the real one (`training.loop.Trainer`), compiled and warmed up once, then
  timed over `batches` steps with a sync at the end only, as the train loop runs it.
  """
  import jax
  from infllava_jax.training import loop

  with tempfile.TemporaryDirectory() as workdir:
    trainer = loop.Trainer(config, workdir)
    batch = loop.global_batch_from_host(next(trainer.data), trainer.mesh)
    state, metrics = trainer.step_fn(trainer.state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(batches):
      state, metrics = trainer.step_fn(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    trainer.data.close()
  return batches * trainer.global_batch / elapsed


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--batches", type=int, default=20)
  args, overrides = parser.parse_known_args(argv)
  config = load_config(args.config, overrides)
  data = pipeline_samples_per_s(config, args.batches)
  step = train_step_samples_per_s(config, args.batches)
  print(f"pipeline: {data:8.1f} samples/s  (workers={config.data.worker_count}, "
        f"batch={config.data.batch_size}, packing={config.data.packing}, "
        f"image={config.model.dcm.image_size}px)")
  print(f"train step: {step:8.1f} samples/s\nratio pipeline/step: {data / step:.2f}x "
        "(goal >= 3x)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
