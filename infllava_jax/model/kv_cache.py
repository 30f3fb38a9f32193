"""The KV cache of the LLM's layers: a plain pytree threaded through the layer scan, so
prefill and decode are one jit-compiled function each with fixed shapes."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax
from ml_collections import ConfigDict

from infllava_jax.model import layers


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `S` slots, and what each slot holds.

  k, v: [L, B*KVH, S, K] (RoPE already applied to k; row b's KV head n at b*KVH + n), or,
    for unrolled layers (`llama.Llama(scan_layers=False)`), a tuple of L arrays
    [B*KVH, S, K]: each layer then updates its own buffer in place, where slicing layers out
    of a stack and re-stacking them copies the whole cache at every decode step.
    Heads-major, the layout the attention products read (`attention.softmax_attention`'s
    batch of B*KVH), with rows and heads on one axis, so a decode step neither transposes
    nor copies the cache (tests/model/test_llama.py::test_a_decode_step_copies_no_cache;
    docs/performance.md#kv-cache-layout).
  segment_ids: [B, S] int32, the segment of the token in each slot; 0 = padding or unwritten.
  index: [] int32, the next slot to write (the same for every row).
  """
  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  index: jax.Array


def init_cache(cfg: ConfigDict, batch: int, max_len: int, dtype: Any = jnp.bfloat16,
               per_layer: bool = False) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated);
  `per_layer` gives the tuple form (see `KVCache`), for unrolled layers only.

  Writing past `max_len` is not detected on device (`dynamic_update_slice` clamps the start),
  so callers size it for the longest prompt plus the tokens to generate.
  """
  shape = (batch * cfg.kv_heads, max_len, cfg.head_dim)
  dtype = layers.dtype_of(dtype)
  if per_layer:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.depth))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.depth))
  else:
    k = v = jnp.zeros((cfg.depth, *shape), dtype)
  return KVCache(k=k, v=v,
                 segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                 index=jnp.zeros((), jnp.int32))




def write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """One layer's keys or values `new` [B, T, KVH, K] (as projected) written into its
  `cache` [B*KVH, S, K] at slots [index, index + T), in the cache's dtype."""
  b, t, kv_heads, k_dim = new.shape
  new = new.swapaxes(1, 2).reshape(b * kv_heads, t, k_dim).astype(cache.dtype)
  return lax.dynamic_update_slice(cache, new, (0, index, 0))
