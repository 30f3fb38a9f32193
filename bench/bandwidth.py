"""The bytes-per-token bound of decoding, shared by bench/generate.py and
bench/accelerator_check.py: a decode step reads every weight once except the embedding table
(a gather of one row per token), so at batch 1 a token takes at least those bytes over the
device's read bandwidth, measured here."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np


def decode_read_bytes(params) -> int:
  """Bytes of the LLM's params (`llama.Llama` layout) a decode step reads: all but `embed/`
  (quantised kernels: their values and scales)."""
  return sum(leaf.nbytes for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if getattr(path[0], "key", None) != "embed")


def read_bandwidth(repeats: int, host_readers: bool = True, device: jax.Device | None = None,
                   size: int = 2 ** 30) -> dict[str, float]:
  """Bytes/s of reading a float32 array of `size` bytes (medians over `repeats`): a jitted jax
  sum on `device` (default: jax's), and with `host_readers` a numpy max and a numpy dot with
  the array split over one thread per core (one thread alone reads about half as fast on
  CPUs)."""
  host = np.random.default_rng(2).random(size // 4, dtype=np.float32)
  dev = jax.device_put(host, device)
  jsum = jax.jit(jnp.sum)
  jsum(dev).block_until_ready()
  readers = {"jax sum": lambda: jsum(dev).block_until_ready()}
  pool = None
  if host_readers:
    parts = np.array_split(host, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(len(parts))

    def threaded(read):
      return lambda: list(pool.map(read, parts))

    def dot(part):
      half = part.size // 2
      return np.dot(part[:half], part[half:2 * half])

    readers.update({"numpy max, threaded": threaded(np.max), "numpy dot, threaded": threaded(dot)})
  times = {name: [] for name in readers}
  for _ in range(repeats):
    for name, read in readers.items():
      start = time.perf_counter()
      read()
      times[name].append(time.perf_counter() - start)
  if pool is not None:
    pool.shutdown()
  return {name: host.nbytes / statistics.median(t) for name, t in times.items()}
