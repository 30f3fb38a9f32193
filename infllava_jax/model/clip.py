"""The CLIP ViT vision tower (docs/fidelity.md#feature-layer): sub-images -> patch features of one hidden state.

The feature is `hidden_states[feature_layer]` in Hugging Face's numbering: hidden_states has
depth + 1 entries, 0 being the embeddings after `pre_layrnorm` and i the output of encoder
layer i. Only the encoder layers that feature needs are built: for the released -2 that is 23
of 24. The unused last layer(s) and `post_layernorm` are therefore not params at all (the
converter skips their tensors, `convert.clip_table.clip_unused`), which saves their memory
and their compute in a frozen tower.

Param tree:
  patch_embed/kernel [p, p, 3, D]   (a flax Conv kernel; applied as one matmul)
  class_embed [D], pos_embed [P + 1, D], pre_norm/{scale, bias}
  layers/{attn_norm, attn/{q, k, v, o}, mlp_norm, mlp/{fc1, fc2}}/...   leading axis: layer
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn
from ml_collections import ConfigDict

from infllava_jax.model import layers
from infllava_jax.model.attention import resolve_attention_impl, unmasked_attention

ACT_AXES = ("batch", "length", "act_embed")
FEATURE_SELECTS = ("patch", "cls_patch")


def num_used_layers(cfg: ConfigDict) -> int:
  """Encoder layers that `hidden_states[cfg.feature_layer]` depends on (23 for -2 of 24).

  Raises ValueError when feature_layer does not index the depth + 1 hidden states.
  """
  states = cfg.depth + 1
  if not -states <= cfg.feature_layer < states:
    raise ValueError(f"model.vision.feature_layer={cfg.feature_layer} does not index the "
                     f"{states} hidden states of a {cfg.depth}-layer CLIP; expected "
                     f"{-states} <= feature_layer < {states}")
  return cfg.feature_layer % states


def num_patches(cfg: ConfigDict) -> int:
  """P, patches per sub-image: (image_size / patch_size)^2 (576 for CLIP-L/14-336)."""
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"model.vision.image_size={cfg.image_size} is not a multiple of "
                     f"patch_size={cfg.patch_size}")
  side = cfg.image_size // cfg.patch_size
  return side * side


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[N, h, w, C] -> [N, P, p*p*C], patches row-major, each flattened as (row, col, channel).

  The (row, col, channel) order is that of a flax Conv kernel [p, p, C, D] flattened to
  [p*p*C, D], so the stride-p convolution is one matmul with that kernel.
  """
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


class PatchEmbed(nn.Module):
  """CLIP's stride-p convolution without bias, as one matmul. [N, h, w, C] -> [N, P, D].

  The kernel keeps a flax Conv's layout [p, p, C, D], so checkpoints read like a Conv's.
  """

  patch: int
  features: int
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, c = self.patch, images.shape[-1]
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None, None, "vision_embed")),
                        (p, p, c, self.features), self.param_dtype)
    return jnp.dot(patchify(images.astype(self.dtype), p),
                   kernel.reshape(p * p * c, self.features).astype(self.dtype),
                   preferred_element_type=self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None) -> jax.Array:
  """`unmasked_attention` for a `config.model.attention_impl` value, resolved here per call:
  the DEM's cross-attention (`dem.CrossAttention`) calls this. The CLIP tower resolves once,
  in `VisionTransformer`. q [N, Tq, H, K]; k, v [N, Tk, H, K] -> [N, Tq, H, K]."""
  return unmasked_attention(q, k, v, resolve_attention_impl(impl, layers.compute_platform()))


class Attention(nn.Module):
  """Multi-head self-attention without a mask, scale 1/sqrt(head_dim). [N, P, D] -> [N, P, D]."""

  heads: int
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention_kernel: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    if d % self.heads:
      raise ValueError(f"model.vision.width={d} is not a multiple of heads={self.heads}")
    head_dim = d // self.heads
    dense = lambda name, axes: layers.Dense(d, axes, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    in_axes = ("vision_embed", "vision_heads")
    q, k, v = (dense(name, in_axes)(x).reshape(n, t, self.heads, head_dim)
               for name in ("q", "k", "v"))
    y = unmasked_attention(q, k, v, self.attention_kernel).reshape(n, t, d)
    return dense("o", ("vision_heads", "vision_embed"))(y)


class MLP(nn.Module):
  """fc1 -> quick_gelu -> fc2. [..., D] -> [..., D]."""

  hidden: int
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Dense(self.hidden, ("vision_embed", "vision_mlp"), name="fc1", **kw)(x)
    h = layers.quick_gelu(h)
    return layers.Dense(x.shape[-1], ("vision_mlp", "vision_embed"), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
  """One pre-LN CLIP encoder layer; `x -> (x, None)` so `nn.scan` can repeat it. [N, P, D]."""

  cfg: ConfigDict
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention_kernel: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(cfg.layer_norm_eps, name="attn_norm", **kw)(x)
    x = x + Attention(cfg.heads, attention_kernel=self.attention_kernel, name="attn", **kw)(h)
    h = layers.LayerNorm(cfg.layer_norm_eps, name="mlp_norm", **kw)(x)
    h = MLP(cfg.mlp_dim, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x + h, ACT_AXES)
    return x, None


class VisionTransformer(nn.Module):
  """CLIP ViT: images [N, h, w, 3] (channels-last, CLIP-normalised) -> features [N, P, D].

  With `cfg.feature_select="cls_patch"` the CLS token is kept in front: [N, P + 1, D].
  N may hold every sub-image of a batch (B*S): the tower runs them all in one call.

  Attributes:
    cfg: `config.model.vision` (image_size, patch_size, width, depth, heads, mlp_dim,
      layer_norm_eps, feature_layer, feature_select, param_dtype).
    dtype: compute dtype (`config.model.dtype`).
    remat_policy: a name of `layers.REMAT_POLICIES` (`config.model.remat_policy`).
    attention_impl: `config.model.attention_impl`, resolved with the platform once per call
      (`attention.resolve_attention_impl`; None: jax's pick on GPU, our einsums elsewhere:
      see `attention.unmasked_attention`).
  """

  cfg: ConfigDict
  dtype: str | layers.Dtype = "float32"
  remat_policy: str = "none"
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.feature_select not in FEATURE_SELECTS:
      raise ValueError(f"model.vision.feature_select={cfg.feature_select!r}; expected one "
                       f"of {FEATURE_SELECTS}")
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"CLIP images: expected [N, {cfg.image_size}, {cfg.image_size}, 3] "
                       f"(model.vision.image_size={cfg.image_size}, channels last), got "
                       f"{tuple(images.shape)}")
    dtype = layers.dtype_of(self.dtype)
    param_dtype = layers.dtype_of(cfg.param_dtype)
    n, d, p = images.shape[0], cfg.width, cfg.patch_size
    num = num_patches(cfg)
    used = num_used_layers(cfg)
    kernel = resolve_attention_impl(self.attention_impl, layers.compute_platform())

    x = PatchEmbed(p, d, dtype=dtype, param_dtype=param_dtype, name="patch_embed")(images)
    cls = self.param("class_embed",
                     nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                  ("vision_embed",)),
                     (d,), param_dtype)
    pos = self.param("pos_embed",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                  (None, "vision_embed")),
                     (num + 1, d), param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (n, 1, d)), x], axis=1)
    x = x + pos.astype(dtype)
    x = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                         name="pre_norm")(x)
    x = nn.with_logical_constraint(x, ACT_AXES)

    if used:
      stack = layers.scan_layers(EncoderLayer, length=used, remat=self.remat_policy)
      x, _ = stack(cfg, dtype=dtype, param_dtype=param_dtype,
                   attention_kernel=kernel, name="layers")(x)

    if cfg.feature_select == "patch":
      x = x[:, 1:]
    chex.assert_shape(x, (n, num + (cfg.feature_select == "cls_patch"), d))
    return x
