"""Attention kernels, and the one place that picks among them (`resolve_attention_impl`).

`model.attention_impl` (None, "einsum", "xla" or "cudnn") and the platform give a kernel,
chosen once where a tower is set up (`llama.Llama`, `clip.VisionTransformer`) and passed
down to its layers, which then dispatch on that name alone (the DEM's cross-attention still
resolves per call, through `clip.attention`):

  "einsum"  ours: for the LLM `softmax_attention` (a written-out VJP) over heads-major
            layouts in causal query chunks (`causal_chunked_attention`), for CLIP and the
            DEM the einsums of `unmasked_attention`; on CPU faster than jax's XLA attention
  "xla", "cudnn"  `jax.nn.dot_product_attention` with that implementation
  "jax"     GPU's default: `jax.nn.dot_product_attention` picking its own implementation
            (its XLA form in jax 0.10; ask for "cudnn" for the flash kernel), except for
            one-token decode steps, which run "einsum" (`decoder_attention`)
  "splash"  TPU's default: Pallas' splash (flash) kernel for the LLM's uncached
            self-attention where its blocks divide the length (`uses_splash`), "einsum"
            everywhere else (the KV cache, CLIP and the DEM)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

CONFIG_CHOICES = (None, "einsum", "xla", "cudnn")
# Kernels that are `jax.nn.dot_product_attention`, with its `implementation` argument.
DOT_PRODUCT_KERNELS = {"xla": "xla", "cudnn": "cudnn", "jax": None}


def resolve_attention_impl(impl: str | None, platform: str) -> str:
  """The kernel (see the module docstring) for `model.attention_impl` on `platform`
  ("cpu", "gpu" or "tpu": `layers.compute_platform()`). An explicit choice wins; None is
  "jax" on GPU, "splash" on TPU and "einsum" elsewhere."""
  if impl not in CONFIG_CHOICES:
    raise ValueError(f"model.attention_impl={impl!r}; expected None, 'einsum', 'xla' or "
                     "'cudnn'")
  if impl is not None:
    return impl
  return {"gpu": "jax", "tpu": "splash"}.get(platform, "einsum")


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
  B*N with contiguous operands. (B, N) kept apart where the model's activations are:
  merged, GSPMD all-gathers the keys and values on a mesh that splits them over different
  axes (docs/performance.md#tensor-axis). Logits, softmax
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
  bool or None (causal, T == S). Returns [B, T, H, K], through `softmax_attention` (faster
  on CPU than a vmap over the group: docs/performance.md#train-step).
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


def uses_splash(kernel: str, length: int) -> bool:
  """Whether uncached self-attention over `length` tokens runs `splash_attention`: for the
  "splash" kernel when the block size divides the length (always, at the recipe's 2048)."""
  return kernel == "splash" and length % min(SPLASH_BLOCK, length) == 0 and length % 128 == 0


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


def decoder_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      scale: float, kernel: str, chunk: int) -> jax.Array:
  """The LLM's causal attention through `kernel` (`resolve_attention_impl`). q [B, T, H, K].

  Self-attention without a cache: k, v [B, T, KVH, K]; mask [B, 1, T, T] bool, None (plain
  causal), or segment ids [B, T] int32 where `uses_splash(kernel, T)`; our path runs in
  query chunks of `chunk` (0: one block). Through the KV cache: k, v [B*KVH, S, K] as
  `kv_cache.KVCache` holds them; mask [B, 1, T, S]. Returns [B, T, H, K].

  One-token decode steps under "jax" run our heads-major products: a flash kernel saves
  nothing over one query, and cuDNN's takes [B, S, KVH, K] operands, so it would likely be
  handed a re-laid-out copy of the whole cache per layer and token
  (docs/performance.md#kv-cache-layout).
  """
  cached = k.ndim == 3
  decode_step = cached and q.shape[1] == 1
  if kernel in DOT_PRODUCT_KERNELS and not (kernel == "jax" and decode_step):
    if cached:  # its layout is [B, S, KVH, K]
      b, _, _, d = q.shape
      k, v = (x.reshape(b, -1, x.shape[1], d).swapaxes(1, 2) for x in (k, v))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=mask is None,
                                        implementation=DOT_PRODUCT_KERNELS[kernel])
  if cached:
    return heads_major_attention(q, k, v, mask, scale)
  if uses_splash(kernel, q.shape[1]):
    return splash_attention(q, k, v, mask, scale)  # mask: segment ids [B, T] (`Llama`)
  return causal_chunked_attention(q, k, v, mask, scale, chunk)


def unmasked_attention(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str) -> jax.Array:
  """Softmax attention without a mask, scale 1/sqrt(K): CLIP's self-attention and the DEM's
  cross-attention. q [N, Tq, H, K]; k, v [N, Tk, H, K] -> [N, Tq, H, K].

  The `DOT_PRODUCT_KERNELS` go to `jax.nn.dot_product_attention` (cuDNN's flash kernel,
  "cudnn", takes bf16/fp16 only); "einsum" and "splash" (which has no unmasked form here)
  run the einsums below, the faster path on CPU (docs/performance.md#encoding-images):
  heads-first operands make both batched dots plain [P, K] x [K, P] GEMMs, and
  normalising after the PV product divides a [P, K] tile instead of [P, P].
  """
  if kernel in DOT_PRODUCT_KERNELS:
    return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                        implementation=DOT_PRODUCT_KERNELS[kernel])
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [N, H, P, K]
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("nhpk,nhsk->nhps", q, k, preferred_element_type=jnp.float32)
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  out = jnp.einsum("nhps,nhsk->nhpk", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / jnp.sum(probs, axis=-1, keepdims=True)
  return out.astype(v.dtype).transpose(0, 2, 1, 3)
