"""LoRA params in a param tree: their names, finding them, splitting them off, merging them.

The layout (qwix's linen LoRA naming): beside a kernel param `kernel` [in, out] (a scanned
stack: [depth, in, out]) sit `kernel_lora_a` [in, rank] and `kernel_lora_b` [rank, out]
(scanned: [depth, in, rank], [depth, rank, out]). The layer's output gains
(x @ a) @ b * alpha / rank (Hu et al. 2021, "LoRA", eq. 3; PEFT's
`lora_B(lora_A(x)) * lora_alpha / r` with lora_A.weight = a.T, lora_B.weight = b.T).

    base, adapters = split(params)                # the tree without / with only LoRA params
    merged = merge(params, rank=64, alpha=16)     # kernels + a @ b * alpha / rank, no LoRA
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from ml_collections import ConfigDict

from infllava_jax.checkpoints import converted
from infllava_jax.errors import ConfigError

SUFFIX_A = "_lora_a"
SUFFIX_B = "_lora_b"


def names(kernel: str = "kernel") -> tuple[str, str]:
  """The names of the LoRA params beside the param `kernel`: (a, b)."""
  return kernel + SUFFIX_A, kernel + SUFFIX_B


def is_lora(path: str | tuple) -> bool:
  """Whether the param at `path` ('/'-joined or a key tuple) is a LoRA factor."""
  last = path.rsplit("/", 1)[-1] if isinstance(path, str) else str(path[-1])
  return last.endswith((SUFFIX_A, SUFFIX_B))


def pairs(flat: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
  """{kernel path: (a path, b path)} of a flat '/'-joined param dict.

  Raises ValueError naming an `_a` without its `_b` (or the reverse) or a pair whose
  kernel is not in the tree.
  """
  found, problems = {}, []
  for path in flat:
    if not is_lora(path):
      continue
    kernel = path.removesuffix(SUFFIX_A).removesuffix(SUFFIX_B)
    a, b = kernel + SUFFIX_A, kernel + SUFFIX_B
    if a not in flat or b not in flat:
      problems.append(f"{path} without {b if path == a else a}")
    elif kernel not in flat:
      problems.append(f"{path} without its kernel {kernel}")
    else:
      found[kernel] = (a, b)
  if problems:
    raise ValueError(f"LoRA params: {'; '.join(sorted(set(problems)))}")
  return found


def split(params: Mapping) -> tuple[dict, dict]:
  """(the tree without LoRA params, the tree of only LoRA params)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  base = {p: x for p, x in flat.items() if not is_lora(p)}
  lora = {p: x for p, x in flat.items() if is_lora(p)}
  return (traverse_util.unflatten_dict(base, sep="/"),
          traverse_util.unflatten_dict(lora, sep="/"))


def merge_kernel(kernel, a, b, scaling: float):
  """kernel + a @ b * scaling, computed in float32 and returned in the kernel's dtype.

  kernel [..., in, out], a [..., in, rank], b [..., rank, out] (leading axes: a scanned
  stack, multiplied layer by layer).
  """
  delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return (jnp.asarray(kernel, jnp.float32) + delta * scaling).astype(kernel.dtype)


def merge(params: Mapping, *, rank: int, alpha: float) -> dict:
  """`params` with every LoRA pair folded into its kernel (`merge_kernel`, scaling
  alpha / rank) and the LoRA params gone: the tree the model without LoRA takes.

  Raises ValueError when a factor's rank is not `rank` (the settings belong to another
  adapter) or a factor is alone (`pairs`).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  found = pairs(flat)
  for kernel, (a, b) in found.items():
    if flat[a].shape[-1] != rank or flat[b].shape[-2] != rank:
      raise ValueError(f"LoRA params of {kernel}: {a} {tuple(flat[a].shape)} and {b} "
                       f"{tuple(flat[b].shape)} are not of rank {rank}")
  merged = {p: x for p, x in flat.items() if not is_lora(p)}
  for kernel, (a, b) in found.items():
    merged[kernel] = merge_kernel(flat[kernel], flat[a], flat[b], alpha / rank)
  return traverse_util.unflatten_dict(merged, sep="/")


def settings(folder, config: ConfigDict) -> tuple[int, float]:
  """(rank, alpha) of the LoRA factors in a folder holding params/: a converted
  checkpoint's lora.json, or a run config's train.lora."""
  saved = converted.read_lora(folder)
  if saved is not None:
    return int(saved["rank"]), float(saved["alpha"])
  lora = config.get("train", ConfigDict()).get("lora")
  if lora is None or lora.get("rank") is None:
    raise ConfigError(f"{folder}: the params hold LoRA factors but neither "
                      f"{converted.LORA_FILE} nor the run config's train.lora gives their "
                      "rank and alpha")
  return int(lora.rank), float(lora.alpha)
