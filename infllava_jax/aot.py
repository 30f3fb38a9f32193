"""Compiling ahead of time without the target hardware: simulated CPU devices or a TPU
topology from libtpu's compile-only client, and the sizes `infllava compile` reads and
prints. Imports no jax at module level (simulated devices must be requested first)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

SIZE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
              "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
GIB = 2 ** 30


def parse_size(text: str) -> int:
  """'80GiB' -> 85899345920 bytes; KB/MB/GB are powers of 10, KiB/MiB/GiB of 2, bare = bytes."""
  match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
  if not match or match.group(2).lower() not in SIZE_UNITS:
    raise argparse.ArgumentTypeError(
        f"size {text!r}: expected a number with an optional unit "
        "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB")
  return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def mesh_device_count(spec: str, default: int) -> int:
  """Devices a --mesh spec needs: the product of 'axis=size,...', or `default` for a preset
  name or a spec with a -1 entry (parsed without importing jax, which must not load yet)."""
  if "=" not in spec:
    return default
  sizes = [int(part.split("=", 1)[1]) for part in spec.split(",") if part.strip()]
  return default if -1 in sizes else math.prod(sizes)


def request_cpu_devices(count: int) -> None:
  """Asks XLA for `count` simulated CPU devices; only works before jax is imported."""
  if "jax" in sys.modules:
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def topology_devices(name: str) -> list:
  """The devices of TPU slice `name` (e.g. 'v5p:2x2x2'), from libtpu's compile-only client:
  enough to lower and compile for them on a machine without TPUs."""
  try:
    import libtpu  # noqa: F401  (jax loads the TPU compiler from it)
  except ImportError:
    raise SystemExit("infllava compile: --topology needs libtpu, the TPU compiler: "
                     "pip install 'infllava-jax[tpu]'") from None
  from jax.experimental import topologies
  # One chip is smaller than libtpu's default host (2x2x1), which it then refuses.
  dims = re.fullmatch(r"[^:]+:([0-9x]+)", name)
  single = bool(dims) and all(d == "1" for d in dims.group(1).split("x"))
  extra = {"chips_per_host_bounds": [1, 1, 1]} if single else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **extra).devices)
  except Exception as e:  # libtpu's own message names the accepted forms
    raise SystemExit(f"infllava compile: --topology {name!r}: {e}") from None


def available_devices(count: int) -> list:
  """The first `count` jax devices; a clear error when jax was started with fewer."""
  import jax
  devices = jax.devices()
  if len(devices) < count:
    raise SystemExit(
        f"infllava compile: the mesh needs {count} devices but jax has {len(devices)} "
        f"({devices[0].platform}). jax was imported before `infllava compile` could ask for "
        f"simulated devices: run it in a fresh process, or set JAX_PLATFORMS=cpu "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax is imported.")
  return devices[:count]


def format_bytes(size: float) -> str:
  """Fixed-width GiB, or MiB below 1 GiB (tiny configs)."""
  return f"{size / GIB:10.3f} GiB" if abs(size) >= GIB else f"{size / 2 ** 20:10.3f} MiB"
