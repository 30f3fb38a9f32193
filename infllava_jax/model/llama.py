"""The LLaMA-3 decoder (spec section 9.1): embeddings -> scanned decoder layers -> logits.

The full model calls `llm.embed(tokens)`, writes the visual tokens into the image slots, then
`llm(embeddings, positions, segment_ids, cache)`. Positions are explicit (they restart per
packed segment, and may start anywhere in left-padded generation), and `segment_ids` say which
tokens may see each other: a token attends to the tokens of its own segment at an earlier or
equal slot. Segment 0 is padding; a real token never attends it.

Param tree (HF names in `convert.llama_table`):
  embed/embedding [V, D]
  layers/{attn_norm/scale, attn/{q, k, v, o}/kernel, mlp_norm/scale,
          mlp/{gate, up, down}/kernel}                  leading axis: layer
  final_norm/scale [D], lm_head/kernel [D, V]

The KV cache is a plain pytree (`KVCache`) threaded through the layer scan, so prefill and
decode are one jit-compiled function each with fixed shapes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec
from ml_collections import ConfigDict

from infllava_jax import sharding
from infllava_jax.model import layers

ACT_AXES = ("batch", "length", "act_embed")
ROPE_TYPES = ("llama3",)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `S` slots, and what each slot holds.

  k, v: [L, B*KVH, S, K] (RoPE already applied to k; row b's KV head n at b*KVH + n), or,
    for unrolled layers (`Llama(scan_layers=False)`), a tuple of L arrays [B*KVH, S, K]:
    each layer then updates its own buffer in place, where slicing layers out of a stack and
    re-stacking them copies the whole cache at every decode step. Heads-major, the layout
    the attention products read (`softmax_attention`'s batch of B*KVH): a [B, S, KVH, K]
    cache was transposed whole at every decode step, ~40% of a batch-8 step's attention on
    CPU (bench/generate.py). Rows and heads are one axis because the write and the products
    then see the same array: with [B, KVH, S, K] at batch 1, XLA:CPU fused the squeeze of
    the unit batch axis into a second copy of the write and copied each layer's cache four
    times per decode step (tests/model/test_llama.py).
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


def rope_inverse_frequencies(cfg: ConfigDict) -> np.ndarray:
  """[K/2] float32 inverse frequencies, computed in float32 exactly as transformers 5.23 does.

  `cfg.rope_scaling` None gives plain RoPE (`_compute_default_rope_parameters`); a dict with
  rope_type "llama3" applies LLaMA-3.1's band-wise scaling (`_compute_llama3_parameters`):
  long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
  """
  dim = cfg.head_dim
  inv_freq = 1.0 / (np.float32(cfg.rope_theta) **
                    (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"model.llm.rope_scaling.rope_type={rope_type!r} is not supported; "
                     f"expected one of {ROPE_TYPES} or rope_scaling=None")
  f32 = np.float32
  factor = f32(scaling["factor"])
  low_freq_factor = f32(scaling["low_freq_factor"])
  high_freq_factor = f32(scaling["high_freq_factor"])
  old_context_len = f32(scaling["original_max_position_embeddings"])
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  wavelen = f32(2 * math.pi) / inv_freq
  inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                    low_freq_factor)
  smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin: [B, T, K] in `dtype` for positions [B, T] (angles in float32, as HF)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF's rotate-half RoPE: x * cos + rotate_half(x) * sin. x: [B, T, N, K]; cos, sin: [B, T, K]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_slots: jax.Array,
                   k_slots: jax.Array) -> jax.Array:
  """[B, 1, T, S] bool: query t sees key s iff same segment and slot_s <= slot_t.

  q_segments [B, T], k_segments [B, S], q_slots [T], k_slots [S]. Examples (one row,
  `1` = may attend):
    packed, segments [1 1 2 2]:  left-padded, segments [0 1 1]:  decode at slot 2 of [0 1 1]:
      1 . . .                      1 . .                          . 1 1
      1 1 . .                      . 1 .
      . . 1 .                      . 1 1
      . . 1 1
  Padding queries (segment 0) see earlier padding, so no row is empty (no NaN in softmax);
  real queries never see padding.
  """
  same = q_segments[:, :, None] == k_segments[:, None, :]
  causal = k_slots[None, None, :] <= q_slots[None, :, None]
  return (same & causal)[:, None]


def _attend_forward(q, k, v, mask, scale):
  """Shared by `softmax_attention` and its VJP: (out, unnormalised probs e, row sums l)."""
  b, n, g, t, d = q.shape
  lead = _batch_axes(q, k)
  logits = jnp.einsum("...qd,...sd->...qs", q.reshape(*lead, g * t, d), k,
                      preferred_element_type=jnp.float32).reshape(b, n, g, t, -1)
  logits = jnp.where(mask, logits * scale, jnp.finfo(jnp.float32).min)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  l = jnp.sum(e, axis=-1, keepdims=True)
  # Normalised after the second product: a [.., T, K] division instead of [.., T, S].
  out = jnp.einsum("...qs,...sd->...qd", e.astype(v.dtype).reshape(*lead, g * t, -1), v,
                   preferred_element_type=jnp.float32).reshape(b, n, g, t, d)
  return (out / l).astype(v.dtype), e, l


def _batch_axes(q: jax.Array, k: jax.Array) -> tuple[int, ...]:
  """The products' batch axes: (B, N) for k [B, N, S, K], (B*N,) for k [B*N, S, K]."""
  b, n = q.shape[:2]
  return (b, n) if k.ndim == 4 else (b * n,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      scale: float) -> jax.Array:
  """softmax(q k^T * scale, masked) v for the G query heads of each KV head: [B, N, G, T, K].

  q [B, N, G, T, K]; k, v [B, N, S, K], or [B*N, S, K] as the KV cache holds them; mask
  bool, broadcastable to [B, N, G, T, S], with at least one key per query row. The G heads
  are folded into the query length, so every product is one batched matmul over (B, N) or
  B*N with contiguous operands. (B, N) kept apart where the model's activations are: on a
  mesh splitting B and N over different axes, merging them made GSPMD all-gather the keys
  and values (14 more all-gathers in a 2-layer step on fsdp=4 x tensor=2). Logits, softmax
  and accumulation are float32; the probabilities enter the second product in the compute
  dtype.

  The VJP is written out (the standard attention backward): it keeps the float32
  unnormalised probabilities and row sums, and gets softmax's row term from
  rowsum(dout * out) over K instead of rowsum(dp * p) over S, so the backward makes one
  element-wise pass over the [T, S] scores (dS = p * (dp - delta)) where autodiff of the
  where/softmax/cast chain makes several and keeps more [T, S] residuals.
  """
  return _attend_forward(q, k, v, mask, scale)[0]


def _softmax_attention_fwd(q, k, v, mask, scale):
  out, e, l = _attend_forward(q, k, v, mask, scale)
  return out, (q, k, v, mask, out, e, l)


def _softmax_attention_bwd(scale, residuals, d_out):
  q, k, v, mask, out, e, l = residuals
  b, n, g, t, d = q.shape
  s = k.shape[-2]
  lead = _batch_axes(q, k)
  p = e / l
  d_out2 = d_out.reshape(*lead, g * t, d)
  dv = jnp.einsum("...qs,...qd->...sd", p.astype(v.dtype).reshape(*lead, g * t, s), d_out2,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("...qd,...sd->...qs", d_out2, v,
                  preferred_element_type=jnp.float32).reshape(b, n, g, t, s)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p * (dp - delta) * scale).astype(q.dtype).reshape(*lead, g * t, s)
  dq = jnp.einsum("...qs,...sd->...qd", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("...qs,...qd->...sd", ds, q.reshape(*lead, g * t, d),
                  preferred_element_type=jnp.float32)
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _to_groups(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, K] -> [B, KVH, G, T, K]: query head h = n * G + j reads KV head n."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _from_groups(out: jax.Array) -> jax.Array:
  """[B, KVH, G, T, K] -> [B, T, H, K]."""
  b, n, g, t, d = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * g, d)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          scale: float) -> jax.Array:
  """Softmax attention with GQA, the math of `jax.nn.dot_product_attention`'s XLA path,
  over keys and values laid out heads-major (as the KV cache holds them).

  q [B, T, H, K]; k, v [B, KVH, S, K], or [B*KVH, S, K] (the KV cache); mask [B, 1, T, S]
  bool or None (causal, T == S). Returns [B, T, H, K], through `softmax_attention` (on CPU
  about 2x faster than jax's vmap over the group, same numbers).
  """
  b, t = q.shape[:2]
  s = k.shape[-2]
  kv_heads = k.shape[1] if k.ndim == 4 else k.shape[0] // b
  mask = jnp.tril(jnp.ones((t, s), bool)) if mask is None else mask[:, :, None]
  return _from_groups(softmax_attention(_to_groups(q, kv_heads), k, v, mask, scale))


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      scale: float) -> jax.Array:
  """`heads_major_attention` for k, v [B, S, KVH, K] (as projected). Returns [B, T, H, K]."""
  return heads_major_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale)


def causal_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                             scale: float, chunk: int) -> jax.Array:
  """`grouped_attention` for self-attention (slot t of q is slot t of k), skipping the
  key blocks that causality masks anyway.

  Query chunk [s, e) only meets keys [0, e): for T = 4 chunks of 128 that is 10/16 of the
  logits, and of their softmax and gradients, which dominate attention on CPU. Exact: the
  skipped keys are masked for these queries. The head-major transposes are made once, not
  per chunk. q [B, T, H, K]; k, v [B, T, KVH, K]; mask [B, 1, T, T] (causal by construction)
  or None (plain causal). Returns [B, T, H, K].
  """
  t = q.shape[1]
  if chunk <= 0 or t <= chunk:
    return grouped_attention(q, k, v, mask, scale)
  q = _to_groups(q, k.shape[2])
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  outs = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    if mask is None:
      block = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    else:
      block = mask[:, :, None, start:end, :end]
    outs.append(softmax_attention(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end], block,
                                  scale))
  return _from_groups(jnp.concatenate(outs, axis=3))


SPLASH_BLOCK = 512


def uses_splash(attention_impl: str | None, length: int) -> bool:
  """Whether uncached self-attention over `length` tokens runs the TPU splash kernel: by
  default on TPU when the block size divides the length (always, at the recipe's 2048)."""
  return (attention_impl is None and layers.compute_platform() == "tpu"
          and length % min(SPLASH_BLOCK, length) == 0 and length % 128 == 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     scale: float, interpret: bool = False) -> jax.Array:
  """Causal self-attention through Pallas' TPU splash kernel (flash attention: the [T, T]
  scores live one block at a time in VMEM, never in HBM, forwards or backwards).

  q [B, T, H, K]; k, v [B, T, KVH, K]; segment_ids [B, T] int32 (a token sees earlier tokens
  of its own segment, as `attention_mask`). Returns [B, T, H, K]. GQA: the kernel's
  one-KV-head (MQA) form, mapped over KV heads and rows. Under a mesh it runs per device in a
  `shard_map` (rows over the batch axes, heads over `tensor`), since XLA cannot partition a
  Pallas call. `interpret` runs the kernel in the Pallas interpreter (tests on CPU).
  """
  b, t, h, d = q.shape
  n = k.shape[2]
  block = min(SPLASH_BLOCK, t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([splash.CausalMask((t, t))] * (h // n)), block_sizes=sizes,
      interpret=interpret)

  def local(q, k, v, segment_ids):
    rows, _, heads, _ = q.shape
    kv_heads = k.shape[2]
    qg = (q * scale).reshape(rows, t, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)   # [B, N, T, K]

    def one_row(q, k, v, seg):
      ids = splash.SegmentIds(q=seg, kv=seg)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(qg, kg, vg, segment_ids)              # [B, N, G, T, K]
    return out.transpose(0, 3, 1, 2, 4).reshape(rows, t, heads, d)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, segment_ids)
  heads_spec = PartitionSpec(*nn.logical_to_mesh_axes(("batch", "length", "act_heads", None)))
  rows_spec = PartitionSpec(*nn.logical_to_mesh_axes(("batch", "length")))
  return jax.shard_map(local, in_specs=(heads_spec,) * 3 + (rows_spec,), out_specs=heads_spec,
                       check_vma=False)(q, k, v, segment_ids)


class Attention(nn.Module):
  """GQA self-attention with RoPE, through an optional per-layer KV cache: [B, T, D] -> same."""

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention_impl: str | None = None
  attention_chunk: int = 0

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, index):
    """x [B, T, D]; mask [B, 1, T, S] or None (plain causal), or segment ids [B, T] where
    `uses_splash`; kv: (k, v) [B*KVH, S, K] (`KVCache`) or None.

    Returns (out [B, T, D], updated (k, v) or None).
    """
    cfg = self.cfg
    b, t, d = x.shape
    h, kvh, k_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
    dense = lambda features, axes, name: layers.Dense(
        features, axes, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    # [B*T, D] @ [D, F]: a plain 2-D matmul forwards and backwards (the weight gradient of
    # a 3-D input contracts two axes, which XLA:CPU runs ~25% slower).
    x = x.reshape(b * t, d)
    q = dense(h * k_dim, ("embed", "heads"), "q")(x).reshape(b, t, h, k_dim)
    k = dense(kvh * k_dim, ("embed", "kv_heads"), "k")(x).reshape(b, t, kvh, k_dim)
    v = dense(kvh * k_dim, ("embed", "kv_heads"), "v")(x).reshape(b, t, kvh, k_dim)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      def write(cache, new):  # new [B, T, KVH, K] into cache [B*KVH, S, K] at slot `index`
        new = new.swapaxes(1, 2).reshape(b * kvh, t, k_dim).astype(cache.dtype)
        return lax.dynamic_update_slice(cache, new, (0, index, 0))

      new_kv = (write(kv[0], k), write(kv[1], v))
      k, v = (cache.astype(self.dtype) for cache in new_kv)  # [B*KVH, S, K] now
    scale = 1.0 / math.sqrt(k_dim)
    # The same choice as the CLIP tower (`clip.attention`): jax's attention on GPU (its own
    # pick: XLA in jax 0.10; "cudnn" asks for flash) or when asked for; our einsum layouts
    # elsewhere, and for
    # one-token decode steps on GPU too: a flash kernel saves nothing over one query, and
    # cuDNN's takes [B, S, KVH, K] operands, so it would likely be handed a re-laid-out copy
    # of the whole heads-major cache per layer and token (XLA's own form folds the swap:
    # no copy on CPU, tests/model/test_llama.py; on GPU unmeasured).
    decode_step = kv is not None and t == 1
    if self.attention_impl in ("xla", "cudnn") or (
        self.attention_impl is None and layers.compute_platform() == "gpu" and not decode_step):
      if kv is not None:  # its layout is [B, S, KVH, K]
        k, v = (x.reshape(b, kvh, -1, k_dim).swapaxes(1, 2) for x in (k, v))
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=mask is None,
                                         implementation=self.attention_impl)
    elif self.attention_impl not in (None, "einsum"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; expected None, "
                       "'einsum', 'xla' or 'cudnn'")
    elif kv is None and uses_splash(self.attention_impl, t):
      out = splash_attention(q, k, v, mask, scale)  # mask: segment ids [B, T] (`Llama`)
    elif kv is None:
      out = causal_chunked_attention(q, k, v, mask, scale, self.attention_chunk)
    else:
      out = heads_major_attention(q, k, v, mask, scale)
    out = dense(d, ("heads", "embed"), "o")(out.reshape(b * t, h * k_dim))
    return out.reshape(b, t, d), new_kv


class Kernel(nn.Module):
  """The kernel `layers.Dense` would create (same name, init and logical axes), returned
  instead of applied: for a product inside a `jax.checkpoint`, where params can't be made."""

  shape: tuple[int, int]
  axes: tuple[str, str]
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             self.axes),
                      self.shape, self.param_dtype)


def _gated_down(gate_out: jax.Array, up_out: jax.Array, down: jax.Array,
                out_dtype: layers.Dtype) -> jax.Array:
  """silu(gate_out) * up_out @ down: [N, F] x2, [F, D] -> [N, D] in `out_dtype` (down cast to
  the activations' dtype here, inside the callers' checkpoints)."""
  hidden = nn.with_logical_constraint(jax.nn.silu(gate_out) * up_out, ("batch", "act_mlp"))
  return jnp.dot(hidden, down.astype(hidden.dtype), preferred_element_type=out_dtype)


def mlp_column_set(kernel: jax.Array, index: jax.Array, sets: int, shards: int,
                   axis: int) -> jax.Array:
  """Column set `index` of `sets` along `kernel`'s MLP axis (`axis`, length F), as
  `swiglu` splits it: [D, F] (axis 1) -> [D, F / sets], or [F, D] (axis 0) -> [F / sets, D].

  F is seen as `shards` contiguous blocks (its `tensor` sharding) and set c takes the c-th
  of `sets` equal slices of every block, so each set is spread over the devices that hold
  F rather than held by a few of them. A slice, not a re-layout of the whole kernel (a
  transposed copy of every layer's weights, which XLA hoists out of the layer loop).
  """
  f = kernel.shape[axis]
  width = f // shards // sets
  blocks = kernel.reshape(*kernel.shape[:axis], shards, f // shards, *kernel.shape[axis + 1:])
  part = lax.dynamic_slice_in_dim(blocks, index * width, width, axis=axis + 1)
  return part.reshape(*kernel.shape[:axis], f // sets, *kernel.shape[axis + 1:])


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
           dtype: layers.Dtype, chunks: int = 1) -> jax.Array:
  """down(silu(x gate) * (x up)): x [N, D]; gate, up [D, F]; down [F, D] -> [N, D] in `dtype`
  (matmul inputs in `dtype`).

  chunks == 1: gate and up are computed whole; silu(gate) * up and the `down` product sit
  in a checkpoint that saves nothing inside, so the backward recomputes the element-wise
  product (one fused pass) and a layer keeps 2 [N, F] residuals instead of 5 (gate, up,
  sigmoid, silu, product).

  chunks > 1: F is cut into `chunks` column sets (`mlp_column_set`) and a scan over them
  adds each set's share of the output (float32 accumulation). The scan body saves
  nothing, so no [N, F] activation is ever whole, forwards or backwards (the backward
  recomputes a set's gate and up: 2 of its 3 forward products, which a layer under remat
  recomputes anyway), and under FSDP XLA gathers one set's weights at a time instead of
  the layer's whole MLP. The same FLOPs as chunks == 1 under a remat'ed layer; smaller
  matmuls. For the 8B model's training configs (`model.mlp_chunks`).
  """
  x = x.astype(dtype)
  if chunks == 1:
    gated_down = jax.checkpoint(_gated_down, policy=jax.checkpoint_policies.nothing_saveable,
                                prevent_cse=False, static_argnums=(3,))
    return gated_down(jnp.dot(x, gate.astype(dtype), preferred_element_type=dtype),
                      jnp.dot(x, up.astype(dtype), preferred_element_type=dtype), down, dtype)
  f = gate.shape[1]
  shards = sharding.logical_axis_size("mlp")
  if f % (chunks * shards):
    raise ValueError(f"model.mlp_chunks={chunks} x {shards} shards of the MLP width does not "
                     f"divide it ({f})")
  # x enters the scan in float32 so that its gradient, summed over the sets in the scan's
  # carry, is accumulated in float32 as one whole product would be.
  x32 = x.astype(jnp.float32)

  def add_set(out, index):
    cut = lambda kernel, axis: mlp_column_set(kernel, index, chunks, shards, axis)
    product = lambda kernel: jnp.dot(x32.astype(dtype), cut(kernel, 1).astype(dtype),
                                     preferred_element_type=dtype)
    return out + _gated_down(product(gate), product(up), cut(down, 0), jnp.float32), None

  add_set = jax.checkpoint(add_set, policy=jax.checkpoint_policies.nothing_saveable,
                           prevent_cse=False)
  out, _ = lax.scan(add_set, jnp.zeros((x.shape[0], down.shape[1]), jnp.float32),
                    jnp.arange(chunks))
  return out.astype(dtype)


class MLP(nn.Module):
  """SwiGLU, no biases (`swiglu`; `chunks` column sets of the MLP width). [B, T, D] -> same."""

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  chunks: int = 1

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    f = self.cfg.mlp_dim
    kernel = lambda shape, axes, name: Kernel(shape, axes, self.param_dtype, name=name)()
    out = swiglu(x.reshape(b * t, d),  # 2-D matmuls, as in Attention
                 kernel((d, f), ("embed", "mlp"), "gate"), kernel((d, f), ("embed", "mlp"), "up"),
                 kernel((f, d), ("mlp", "embed"), "down"), self.dtype, self.chunks)
    return out.reshape(b, t, d)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). The scan body: (x, *xs) -> (x, kv)."""

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention_impl: str | None = None
  attention_chunk: int = 0
  mlp_chunks: int = 1

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, index):
    norm = lambda name: layers.RMSNorm(self.cfg.rms_norm_eps, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    attn = Attention(self.cfg, self.dtype, self.param_dtype, self.attention_impl,
                     self.attention_chunk, name="attn")
    attn_out, new_kv = attn(norm("attn_norm")(x), cos, sin, mask, kv, index)
    x = nn.with_logical_constraint(x + attn_out, ACT_AXES)
    # Column sets are for training: with a cache (prefill, decoding) there is no backward
    # to save memory for, only a loop of smaller products at every token.
    chunks = self.mlp_chunks if kv is None else 1
    mlp = MLP(self.cfg, self.dtype, self.param_dtype, chunks, name="mlp")
    x = x + mlp(norm("mlp_norm")(x))
    return nn.with_logical_constraint(x, ACT_AXES), new_kv


class Embedder(nn.Module):
  """Token embedding table. tokens [B, T] int32 -> [B, T, D] in the compute dtype."""

  vocab_size: int
  width: int
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")),
                       (self.vocab_size, self.width), self.param_dtype)
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ACT_AXES)


def project_to_vocab(x: jax.Array, kernel: jax.Array, dtype: layers.Dtype,
                     axes: tuple[str, ...] = ("batch", "length", "act_vocab")) -> jax.Array:
  """[B, T, D] @ lm_head kernel [D, V] -> [B, T, V] float32 logits (inputs cast to `dtype`,
  float32 accumulation), laid out as the logical `axes` say; `LMHead` and the chunked loss
  (`optim.chunked_cross_entropy`)."""
  b, t, d = x.shape
  logits = jnp.dot(x.reshape(b * t, d).astype(dtype), kernel.astype(dtype),
                   preferred_element_type=jnp.float32).reshape(b, t, kernel.shape[1])
  return nn.with_logical_constraint(logits, axes)


class LMHead(nn.Module):
  """Untied output projection [B, T, D] -> [B, T, V] float32 logits (float32 accumulation)."""

  vocab_size: int
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               ("embed", "vocab")),
                        (x.shape[-1], self.vocab_size), self.param_dtype)
    return project_to_vocab(x, kernel, self.dtype)


def unstack_layers(params, depth: int, consume: bool = False):
  """Scanned params (`layers/...`, a leading layer axis) -> the `scan_layers=False` tree
  (`layers_0/...` ... `layers_{depth-1}/...`); the other params are shared, not copied.

  consume: delete each stacked jax.Array once its layers are copied out (the caller gives
  `params` up), so the device holds one stacked array beside the layers, not the whole
  stack twice (8B bf16: +3.5 GB at most instead of +13 GB).
  """
  def unstack(x):
    layers = [x[i] for i in range(depth)]
    if consume and isinstance(x, jax.Array):
      jax.block_until_ready(layers)
      x.delete()
    return layers

  stacks = jax.tree.map(unstack, params["layers"])
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(depth):
    out[f"layers_{i}"] = jax.tree.map(lambda layers, i=i: layers[i], stacks,
                                      is_leaf=lambda x: isinstance(x, list))
  return out


class Llama(nn.Module):
  """LLaMA-3 decoder. `embed(tokens)` and `__call__(embeddings, ...)`; see the module docstring.

  Attributes:
    cfg: `model.llm` (width, depth, heads, kv_heads, head_dim, mlp_dim, vocab_size,
      rms_norm_eps, rope_theta, rope_scaling, param_dtype).
    dtype: compute dtype (activations, matmul inputs, KV written to the cache).
    remat_policy: a name of `layers.REMAT_POLICIES`.
    attention_impl: "einsum" computes attention with `grouped_attention` (the XLA math in a
      layout that runs ~2x faster on CPU); "xla" or "cudnn" call
      `jax.nn.dot_product_attention` with that implementation; None is "einsum", except on
      GPU where jax picks (in jax 0.10 its XLA form; "cudnn" asks for the flash kernel) and
      on TPU, where
      uncached self-attention runs `splash_attention` when `uses_splash` says it fits.
    attention_chunk: query block of `causal_chunked_attention` when attention_impl is None
      and no cache is used; 0 disables it.
    mlp_chunks: column sets of the MLP width computed one at a time (`swiglu`); 1 computes
      the MLP whole.
    scan_layers: True (the default, and the checkpoint layout) scans one compiled layer
      body over stacked params `layers/...` with a leading layer axis. False builds `depth`
      separate layers with params `layers_0/...`, `layers_1/...` (no leading axis; the
      conversion tables do not read this layout): the same function, for tools that need
      every layer in the HLO, e.g. XLA's `cost_analysis`, which counts a scan body once.
  """

  cfg: ConfigDict
  dtype: layers.Dtype = jnp.float32
  remat_policy: str = "none"
  attention_impl: str | None = None
  attention_chunk: int = 128
  mlp_chunks: int = 1
  scan_layers: bool = True

  def setup(self):
    cfg = self.cfg
    if cfg.heads % cfg.kv_heads:
      raise ValueError(f"model.llm.heads={cfg.heads} is not a multiple of "
                       f"kv_heads={cfg.kv_heads}")
    param_dtype = layers.dtype_of(cfg.param_dtype)
    dtype = layers.dtype_of(self.dtype)
    self.inv_freq = rope_inverse_frequencies(cfg)
    # `self.llm.embed(tokens)` is this submodule's call; its params live at embed/embedding.
    self.embed = Embedder(cfg.vocab_size, cfg.width, dtype, param_dtype)
    if self.scan_layers:
      scanned = layers.scan_layers(
          DecoderLayer, length=cfg.depth, remat=self.remat_policy,
          # cos, sin, mask and the write index are shared; the cache is split by layer.
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast))
      self.layers = scanned(cfg, dtype, param_dtype, self.attention_impl, self.attention_chunk,
                            self.mlp_chunks)
    else:
      block = DecoderLayer
      if self.remat_policy != "none":
        block = nn.remat(DecoderLayer, policy=layers.remat_policy(self.remat_policy),
                         prevent_cse=False)
      self.layers = [block(cfg, dtype, param_dtype, self.attention_impl, self.attention_chunk,
                           self.mlp_chunks, name=f"layers_{i}") for i in range(cfg.depth)]
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.lm_head = LMHead(cfg.vocab_size, dtype, param_dtype)

  def __call__(self, embeddings: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None,
               cache: KVCache | None = None,
               head: bool = True) -> tuple[jax.Array, KVCache | None]:
    """embeddings [B, T, D], positions [B, T] int32, segment_ids [B, T] int32 or None.

    segment_ids None means one segment per row with no padding (plain causal attention).
    With `cache`, the T tokens are written at slots [index, index + T) and attend to every
    cached slot before them; the returned cache has index + T.
    Returns (logits [B, T, V] float32, the updated cache or None); with head=False the
    final-norm hidden states [B, T, D] instead of logits (the lm_head kernel is then applied
    by the loss, a chunk of tokens at a time: `optim.chunked_cross_entropy`).
    """
    cfg = self.cfg
    b, t = positions.shape
    chex.assert_shape(embeddings, (b, t, cfg.width))
    dtype = layers.dtype_of(self.dtype)
    x = nn.with_logical_constraint(embeddings.astype(dtype), ACT_AXES)
    cos, sin = rope_tables(positions, self.inv_freq, dtype)
    if segment_ids is not None:
      chex.assert_shape(segment_ids, (b, t))
    if cache is None:
      kv = index = None
      if uses_splash(self.attention_impl, t):
        # The splash kernel takes segment ids and builds its mask block by block.
        mask = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
      else:
        # Without packing or padding the causal mask is implied, never materialised.
        mask = None if segment_ids is None else attention_mask(
            segment_ids, segment_ids, jnp.arange(t), jnp.arange(t))
    else:
      per_layer = isinstance(cache.k, tuple)
      if per_layer and self.scan_layers:
        raise ValueError("a per-layer KV cache (init_cache(per_layer=True)) needs "
                         "Llama(scan_layers=False); scanned layers read the stacked one")
      layer_shape = (b * cfg.kv_heads, None, cfg.head_dim)
      if per_layer:
        chex.assert_equal(len(cache.k), cfg.depth)
        chex.assert_shape(cache.k, layer_shape)
      else:
        chex.assert_shape(cache.k, (cfg.depth, *layer_shape))
      if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
      index = cache.index
      cache_segments = lax.dynamic_update_slice(cache.segment_ids,
                                                segment_ids.astype(jnp.int32), (0, index))
      slots = cache_segments.shape[1]
      mask = attention_mask(segment_ids, cache_segments, index + jnp.arange(t),
                            jnp.arange(slots))
      kv = (cache.k, cache.v)
    if self.scan_layers:
      x, new_kv = self.layers(x, cos, sin, mask, kv, index)
    else:
      layer_kvs = []
      for i, layer in enumerate(self.layers):
        x, layer_kv = layer(x, cos, sin, mask, None if kv is None else (kv[0][i], kv[1][i]),
                            index)
        layer_kvs.append(layer_kv)
      new_kv = None
      if kv is not None:
        new_kv = tuple(tuple(layer_kv[j] for layer_kv in layer_kvs) for j in range(2))
        if not per_layer:
          new_kv = tuple(jnp.stack(arrays) for arrays in new_kv)
    out = self.final_norm(x)
    if head:
      out = self.lm_head(out)
      chex.assert_shape(out, (b, t, cfg.vocab_size))
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=new_kv[0], v=new_kv[1], segment_ids=cache_segments, index=index + t)
    return out, new_cache

  def tokens_to_logits(self, tokens: jax.Array, positions: jax.Array,
                       segment_ids: jax.Array | None = None,
                       cache: KVCache | None = None,
                       head: bool = True) -> tuple[jax.Array, KVCache | None]:
    """The text-only path `self(self.embed(tokens), ...)`; `init` through it creates every param."""
    return self(self.embed(tokens), positions, segment_ids, cache, head)
