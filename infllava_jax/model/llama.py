"""The LLaMA-3 decoder (docs/fidelity.md#language-model): embeddings -> scanned decoder layers -> logits.

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

The attention kernels are in `model.attention` (chosen once, in `Llama.setup`), RoPE in
`model.rope`, and the KV cache (`kv_cache.KVCache`, threaded through the layer scan) in
`model.kv_cache`.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from ml_collections import ConfigDict

from infllava_jax import sharding
from infllava_jax.model import attention, kv_cache, layers, rope

ACT_AXES = ("batch", "length", "act_embed")


class Attention(nn.Module):
  """GQA self-attention with RoPE, through an optional per-layer KV cache: [B, T, D] -> same."""

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention_kernel: str = "einsum"
  attention_chunk: int = 0

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, index):
    """x [B, T, D]; mask [B, 1, T, S] or None (plain causal), or segment ids [B, T] where
    `attention.uses_splash`; kv: (k, v) [B*KVH, S, K] (`kv_cache.KVCache`) or None.

    Returns (out [B, T, D], updated (k, v) or None).
    """
    cfg = self.cfg
    b, t, d = x.shape
    h, kvh, k_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
    dense = lambda features, axes, name: layers.Dense(
        features, axes, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    # [B*T, D] @ [D, F]: a plain 2-D matmul forwards and backwards
    # (docs/performance.md#train-step).
    x = x.reshape(b * t, d)
    q = dense(h * k_dim, ("embed", "heads"), "q")(x).reshape(b, t, h, k_dim)
    k = dense(kvh * k_dim, ("embed", "kv_heads"), "k")(x).reshape(b, t, kvh, k_dim)
    v = dense(kvh * k_dim, ("embed", "kv_heads"), "v")(x).reshape(b, t, kvh, k_dim)
    q = rope.apply_rope(q, cos, sin)
    k = rope.apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      new_kv = (kv_cache.write(kv[0], k, index), kv_cache.write(kv[1], v, index))
      k, v = (cache.astype(self.dtype) for cache in new_kv)  # [B*KVH, S, K] now
    out = attention.decoder_attention(q, k, v, mask, 1.0 / math.sqrt(k_dim),
                                      self.attention_kernel, self.attention_chunk)
    out = dense(d, ("heads", "embed"), "o")(out.reshape(b * t, h * k_dim))
    return out.reshape(b, t, d), new_kv


class Kernel(nn.Module):
  """The kernel `layers.Dense` would create (same name, init and logical axes), returned
  instead of applied: for `swiglu`'s column sets, which slice it inside a checkpoint."""

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


class GatedDown(nn.Module):
  """`down(silu(gate_out) * up_out)`: [N, F] x2 -> [N, D], owning the `down` kernel [F, D],
  so that the product runs in the module that holds its weight (where qwix's rules, by
  module path, find it: `quantize.py`, `lora/provider.py`)."""

  features: int
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, gate_out: jax.Array, up_out: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               ("mlp", "embed")),
                        (gate_out.shape[-1], self.features), self.param_dtype)
    return _gated_down(gate_out, up_out, kernel, self.dtype)


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
           dtype: layers.Dtype, chunks: int) -> jax.Array:
  """down(silu(x gate) * (x up)) in `chunks` column sets of the MLP width: x [N, D]; gate,
  up [D, F]; down [F, D] -> [N, D] in `dtype` (matmul inputs in `dtype`).

  F is cut into `chunks` column sets (`mlp_column_set`) and a scan over them adds each
  set's share of the output (float32 accumulation). The scan body saves nothing, so no
  [N, F] activation is ever whole, forwards or backwards (the backward recomputes a set's
  gate and up: 2 of its 3 forward products, which a layer under remat recomputes anyway),
  and under FSDP XLA gathers one set's weights at a time instead of the layer's whole MLP.
  The same FLOPs as the whole MLP (`MLP`) under a remat'ed layer; smaller matmuls. For
  the 8B model's full training configs (`model.mlp_chunks`).
  """
  x = x.astype(dtype)
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
  """SwiGLU, no biases: [B, T, D] -> same. Params gate, up [D, F], down [F, D].

  chunks == 1: gate and up are `layers.Dense` products and `GatedDown` (the `down` kernel's
  module) computes silu(gate) * up and its product under a remat that saves nothing inside,
  so the backward recomputes the element-wise product (one fused pass) and a layer keeps 2
  [N, F] residuals instead of 5 (gate, up, sigmoid, silu, product). Every product runs in
  the module owning its kernel: the form LoRA and low-bit weights (qwix) apply to.
  chunks > 1: the MLP width in column sets, one at a time (`swiglu`).
  """

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  chunks: int = 1

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    f = self.cfg.mlp_dim
    x = x.reshape(b * t, d)  # 2-D matmuls, as in Attention
    if self.chunks > 1:
      kernel = lambda shape, axes, name: Kernel(shape, axes, self.param_dtype, name=name)()
      out = swiglu(x, kernel((d, f), ("embed", "mlp"), "gate"),
                   kernel((d, f), ("embed", "mlp"), "up"), kernel((f, d), ("mlp", "embed"), "down"),
                   self.dtype, self.chunks)
      return out.reshape(b, t, d)
    dense = lambda name: layers.Dense(f, ("embed", "mlp"), use_bias=False, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=name)
    gated_down = nn.remat(GatedDown, policy=jax.checkpoint_policies.nothing_saveable,
                          prevent_cse=False)
    out = gated_down(d, self.dtype, self.param_dtype, name="down")(dense("gate")(x),
                                                                   dense("up")(x))
    return out.reshape(b, t, d)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). The scan body: (x, *xs) -> (x, kv)."""

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention_kernel: str = "einsum"
  attention_chunk: int = 0
  mlp_chunks: int = 1

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, index):
    norm = lambda name: layers.RMSNorm(self.cfg.rms_norm_eps, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    attn = Attention(self.cfg, self.dtype, self.param_dtype, self.attention_kernel,
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
    attention_impl: `config.model.attention_impl`: None, "einsum", "xla" or "cudnn";
      `attention.resolve_attention_impl` turns it and the platform into the layers' kernel
      once, in `setup` (None: jax's pick on GPU, splash on TPU, ours elsewhere).
    attention_chunk: query block of `attention.causal_chunked_attention` where our kernel
      runs without a cache; 0 disables it.
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
    self.inv_freq = rope.rope_inverse_frequencies(cfg)
    # Under the mesh in context at trace time: a TPU compile from a CPU host picks TPU's.
    self.attention_kernel = attention.resolve_attention_impl(self.attention_impl,
                                                             layers.compute_platform())
    # `self.llm.embed(tokens)` is this submodule's call; its params live at embed/embedding.
    self.embed = Embedder(cfg.vocab_size, cfg.width, dtype, param_dtype)
    if self.scan_layers:
      scanned = layers.scan_layers(
          DecoderLayer, length=cfg.depth, remat=self.remat_policy,
          # cos, sin, mask and the write index are shared; the cache is split by layer.
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast))
      self.layers = scanned(cfg, dtype, param_dtype, self.attention_kernel, self.attention_chunk,
                            self.mlp_chunks)
    else:
      block = DecoderLayer
      if self.remat_policy != "none":
        block = nn.remat(DecoderLayer, policy=layers.remat_policy(self.remat_policy),
                         prevent_cse=False)
      self.layers = [block(cfg, dtype, param_dtype, self.attention_kernel, self.attention_chunk,
                           self.mlp_chunks, name=f"layers_{i}") for i in range(cfg.depth)]
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.lm_head = LMHead(cfg.vocab_size, dtype, param_dtype)

  def __call__(self, embeddings: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None,
               cache: kv_cache.KVCache | None = None,
               head: bool = True) -> tuple[jax.Array, kv_cache.KVCache | None]:
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
    cos, sin = rope.rope_tables(positions, self.inv_freq, dtype)
    if segment_ids is not None:
      chex.assert_shape(segment_ids, (b, t))
    if cache is None:
      kv = index = None
      if attention.uses_splash(self.attention_kernel, t):
        # The splash kernel takes segment ids and builds its mask block by block.
        mask = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
      else:
        # Without packing or padding the causal mask is implied, never materialised.
        mask = None if segment_ids is None else attention.attention_mask(
            segment_ids, segment_ids, jnp.arange(t), jnp.arange(t))
    else:
      per_layer = isinstance(cache.k, tuple)
      if per_layer and self.scan_layers:
        raise ValueError("a per-layer KV cache (kv_cache.init_cache(per_layer=True)) needs "
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
      mask = attention.attention_mask(segment_ids, cache_segments, index + jnp.arange(t),
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
      new_cache = kv_cache.KVCache(k=new_kv[0], v=new_kv[1], segment_ids=cache_segments,
                                   index=index + t)
    return out, new_cache

  def tokens_to_logits(self, tokens: jax.Array, positions: jax.Array,
                       segment_ids: jax.Array | None = None,
                       cache: kv_cache.KVCache | None = None,
                       head: bool = True) -> tuple[jax.Array, kv_cache.KVCache | None]:
    """The text-only path `self(self.embed(tokens), ...)`; `init` through it creates every param."""
    return self(self.embed(tokens), positions, segment_ids, cache, head)
