"""The Dual-perspective Enhancement Module (paper §4.3; docs/fidelity.md#enhancement-windows): view features -> [B, P, D].

Shapes: B batch, S = N_h*N_w sub-images, P = p_h*p_w patches per view, D = vision width,
maps are `[B, N_h*p_h, N_w*p_w, D]` (72x72 for the released model).

1. Recombination (paper eqs. 5-6; docs/fidelity.md#recombination). The local features tile the local map L in blocks; the global
   features interleave into the global map G:
     L[R, C] = F_loc[N_w*(R//p_h) + C//p_w][R % p_h, C % p_w]
     G[R, C] = F_glob[N_w*(R % N_h) + C % N_w][R//N_h, C//N_w]
   With two 2x2 features holding `10k + (2r + c)` (n = 2; docs/fidelity.md#test-vectors):
     L = [0,1,10,11] / [2,3,12,13] / [20,21,30,31] / [22,23,32,33]
     G = [0,10,1,11] / [20,30,21,31] / [2,12,3,13] / [22,32,23,33]
   `block_windows` and `stride_windows` are the inverses: Block_k(L) = F_loc[k] and
   Stride_k(G) = F_glob[k].
2. One shared cross-attention `MHA(q, kv) = LN(O(attn(Q q, K kv, V kv)) + q)` (docs/fidelity.md#attention-block; one for both branches: #shared-attention) runs
   branch A (queries Block_k(G), keys/values F_loc[k]: Genh, the paper's global-perspective
   enhancement) and branch B (queries Stride_k(L), keys/values F_glob[k]: Lenh, the
   local-perspective enhancement). All S windows of a branch are one batched call.
3. Fusion (paper eqs. 26-27 as released: docs/fidelity.md#fusion): `Z = LN(concat[mlp_local(Lenh), mlp_global(Genh)] + Genh + Lenh)`.
4. Token reduction to one view's patch grid (paper eq. 7 as released: docs/fidelity.md#token-reduction), then the low-res merge (docs/fidelity.md#resolution-merge).

The reduced path (docs/fidelity.md#unused-global-crops) computes the same output from the S local features and the
centre global feature only: with bilinear reduction at an odd ratio only the centre
positions of each n x n cell survive, so it evaluates the pipeline at those P positions.
`dcm.plan` decides when it applies and which views the input holds.

Ablations (config `model.dem` / `model.dcm`):
  enhance="global": only branch A; Lenh := L (the local map enters the fusion un-enhanced).
  enhance="local":  only branch B; Genh := G.
  enhance="none":   no attention (and no attention params); Lenh := L, Genh := G.
  fusion="add":     Z = LN(Genh + Lenh) (the concat term dropped: no fusion MLPs).
  crops="local"/"global" (needs enhance="none"): Z = L or G alone, no fusion params at all;
    the paper's "w/ DCM local / global" rows.
  crops="none": the LLaVA-1.5 baseline, output = the single low-res view's features.
  reduction="avg": mean over each n x n cell (the paper's wording) instead of bilinear.
  merge: "mean" 0.5*(F_low + out) (released), "add" F_low + out (paper text), "none" out only
    (the paper's single-resolution rows).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from ml_collections import ConfigDict

from infllava_jax.model import clip, dcm, layers

FUSIONS = ("concat", "add")
ACT_AXES = ("batch", "length", "act_embed")


# ----------------------------------------------------------------------------- recombination


def combine_local(feats: jax.Array, grid: tuple[int, int], patches: tuple[int, int]) -> jax.Array:
  """[B, S, P, D] -> L [B, N_h*p_h, N_w*p_w, D]: sub-feature k is block (k // N_w, k % N_w)."""
  (n_h, n_w), (p_h, p_w) = grid, patches
  b, _, _, d = feats.shape
  x = feats.reshape(b, n_h, n_w, p_h, p_w, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, n_h * p_h, n_w * p_w, d)


def combine_global(feats: jax.Array, grid: tuple[int, int], patches: tuple[int, int]) -> jax.Array:
  """[B, S, P, D] -> G [B, p_h*N_h, p_w*N_w, D]: sub-feature k fills phase (k // N_w, k % N_w)."""
  (n_h, n_w), (p_h, p_w) = grid, patches
  b, _, _, d = feats.shape
  x = feats.reshape(b, n_h, n_w, p_h, p_w, d).transpose(0, 3, 1, 4, 2, 5)
  return x.reshape(b, p_h * n_h, p_w * n_w, d)


def block_windows(maps: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, H, W, D] -> [B, S, P, D]: Block_k, the contiguous (H/N_h x W/N_w) windows, row-major."""
  n_h, n_w = grid
  b, height, width, d = maps.shape
  p_h, p_w = height // n_h, width // n_w
  x = maps.reshape(b, n_h, p_h, n_w, p_w, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, n_h * n_w, p_h * p_w, d)


def stride_windows(maps: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, H, W, D] -> [B, S, P, D]: Stride_k = maps[k // N_w :: N_h, k % N_w :: N_w]."""
  n_h, n_w = grid
  b, height, width, d = maps.shape
  p_h, p_w = height // n_h, width // n_w
  x = maps.reshape(b, p_h, n_h, p_w, n_w, d).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, n_h * n_w, p_h * p_w, d)


def reduce_tokens(maps: jax.Array, patches: tuple[int, int], method: str) -> jax.Array:
  """[B, N_h*p_h, N_w*p_w, D] -> [B, P, D] (docs/fidelity.md#token-reduction).

  "bilinear": PyTorch's align_corners=False resize, exact for integer ratios (a pick at odd
  ratios, the mean of the two middle rows/columns at even ones). "avg": n x n mean pooling.
  Both in float32, cast back.
  """
  b, height, width, d = maps.shape
  p_h, p_w = patches
  if method == "bilinear":
    out = dcm.resize(maps, patches, "bilinear")
  elif method == "avg":
    x = maps.astype(jnp.float32).reshape(b, p_h, height // p_h, p_w, width // p_w, d)
    out = x.mean(axis=(2, 4)).astype(maps.dtype)
  else:
    raise ValueError(f"model.dem.reduction={method!r}; expected one of {list(dcm.REDUCTIONS)}")
  return out.reshape(b, p_h * p_w, d)


@functools.lru_cache(maxsize=16)
def reduced_index(grid: tuple[int, int], patches: tuple[int, int]):
  """Static gather maps of the reduced path (docs/fidelity.md#unused-global-crops), for odd grids.

  Output token t = (i, j) sits at map position (R, C) = (N_h*i + N_h//2, N_w*j + N_w//2),
  inside block k(t) = N_w*(R // p_h) + C // p_w. Returns numpy int arrays:
    local [P]: flat index into the [S*P] local tokens of L[R, C] = F_loc[k][R % p_h, C % p_w].
    group [S, Q]: the tokens t whose block is k, padded with 0 to Q = the largest block
      count (so branch A is one batched call of S windows with Q queries each).
    slot [P]: where token t's result lies in the flattened [S*Q] branch-A output.
  The released 3x3 grid of 24x24 patches gives Q = 64 (9 calls of 64 x 576).
  """
  (n_h, n_w), (p_h, p_w) = grid, patches
  i, j = np.meshgrid(np.arange(p_h), np.arange(p_w), indexing="ij")
  rows, cols = (n_h * i + n_h // 2).ravel(), (n_w * j + n_w // 2).ravel()
  block = n_w * (rows // p_h) + cols // p_w
  local = block * (p_h * p_w) + (rows % p_h) * p_w + cols % p_w
  counts = np.bincount(block, minlength=n_h * n_w)
  group = np.zeros((n_h * n_w, counts.max()), np.int32)
  slot = np.zeros(p_h * p_w, np.int32)
  for k in range(n_h * n_w):
    members = np.flatnonzero(block == k)
    group[k, :members.size] = members
    slot[members] = k * counts.max() + np.arange(members.size)
  return local.astype(np.int32), group, slot


# ----------------------------------------------------------------------------- modules


class CrossAttention(nn.Module):
  """The DEM's one shared MHA (docs/fidelity.md#attention-block): `LN(o(attend(q(x), k(y), v(y))) + x)`.

  [N, Tq, D], [N, Tk, D] -> [N, Tq, D]. Heads are contiguous channel chunks, softmax over keys
  with scale 1/sqrt(D/H), no mask or dropout; post-LN residual of the raw, unprojected query.
  `attention_impl` is `config.model.attention_impl`, as for CLIP (`clip.attention`: jax's
  attention on GPU, heads-first einsums elsewhere).
  """

  heads: int
  eps: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, query: jax.Array, kv: jax.Array) -> jax.Array:
    n, t_q, d = query.shape
    chex.assert_shape(kv, (n, None, d))
    dense = lambda name, axes: layers.torch_dense(d, d, axes, dtype=self.dtype,
                                                  param_dtype=self.param_dtype, name=name)
    split = lambda x: x.reshape(*x.shape[:2], self.heads, d // self.heads)
    q = split(dense("q", ("vision_embed", "vision_heads"))(query))
    k = split(dense("k", ("vision_embed", "vision_heads"))(kv))
    v = split(dense("v", ("vision_embed", "vision_heads"))(kv))
    o = clip.attention(q, k, v, self.attention_impl)
    o = dense("o", ("vision_heads", "vision_embed"))(o.reshape(n, t_q, d))
    return layers.LayerNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="norm")(o + query.astype(self.dtype))


class BottleneckMLP(nn.Module):
  """`fc2(gelu_exact(fc1(x)))`, D -> hidden -> out (PyTorch `Sequential(Linear, GELU, Linear)`)."""

  hidden: int
  out: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.torch_dense(self.hidden, x.shape[-1], ("vision_embed", "vision_mlp"),
                           name="fc1", **dtypes)(x)
    return layers.torch_dense(self.out, self.hidden, ("vision_mlp", "vision_embed"),
                              name="fc2", **dtypes)(layers.exact_gelu(h))


class DualPerspectiveEnhancement(nn.Module):
  """View features -> visual tokens: `[B, V, P, D] -> [B, P, D]`, V and order by `plan`.

  Build it with `from_config(model_cfg)`. Param tree (released config):
    attention/{q,k,v,o}/{kernel,bias}, attention/norm/{scale,bias},
    mlp_local/{fc1,fc2}/{kernel,bias}   (PyTorch ffn_crop: on Lenh, channels [0, D/2))
    mlp_global/{fc1,fc2}/{kernel,bias}  (PyTorch ffn_stride: on Genh, channels [D/2, D))
    fuse_norm/{scale,bias}
  """

  plan: dcm.ViewPlan
  patches: tuple[int, int]
  width: int
  heads: int = 8
  enhance: str = "both"
  fusion: str = "concat"
  reduction: str = "bilinear"
  merge: str = "mean"
  bottleneck_ratio: int = 16
  layer_norm_eps: float = 1e-5
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, model_cfg: ConfigDict, **kwargs) -> "DualPerspectiveEnhancement":
    """The module of `model_cfg`; ValueError names any invalid model.dem / model.dcm field."""
    view_plan = dcm.plan(model_cfg)
    dem_cfg, width = model_cfg.dem, model_cfg.vision.width
    fusion = dcm.choice(model_cfg, "dem.fusion", FUSIONS)
    if dem_cfg.heads < 1 or width % dem_cfg.heads:
      raise ValueError(f"model.dem.heads={dem_cfg.heads} does not divide "
                       f"model.vision.width={width}")
    if fusion == "concat" and (width % 2 or dem_cfg.bottleneck_ratio < 1
                               or width // dem_cfg.bottleneck_ratio < 1):
      raise ValueError(f"model.dem.bottleneck_ratio={dem_cfg.bottleneck_ratio} with "
                       f"model.vision.width={width}: expected an even width and "
                       "1 <= bottleneck_ratio <= width")
    if not dem_cfg.layer_norm_eps > 0:
      raise ValueError(f"model.dem.layer_norm_eps={dem_cfg.layer_norm_eps}; expected > 0")
    side = model_cfg.vision.image_size // model_cfg.vision.patch_size
    return cls(plan=view_plan, patches=(side, side), width=width, heads=dem_cfg.heads,
               enhance=dem_cfg.enhance, fusion=fusion, reduction=dem_cfg.reduction,
               merge=dem_cfg.merge, bottleneck_ratio=dem_cfg.bottleneck_ratio,
               layer_norm_eps=dem_cfg.layer_norm_eps, dtype=layers.dtype_of(model_cfg.dtype),
               attention_impl=model_cfg.get("attention_impl"), **kwargs)

  def setup(self):
    dtypes = dict(dtype=layers.dtype_of(self.dtype), param_dtype=self.param_dtype)
    self.attention = CrossAttention(self.heads, self.layer_norm_eps,
                                    attention_impl=self.attention_impl, **dtypes)
    half = self.width // 2
    self.mlp_local = BottleneckMLP(self.width // self.bottleneck_ratio, half, **dtypes)
    self.mlp_global = BottleneckMLP(self.width // self.bottleneck_ratio, half, **dtypes)
    self.fuse_norm = layers.LayerNorm(self.layer_norm_eps, **dtypes)

  def __call__(self, feats: jax.Array) -> jax.Array:
    """[B, V, P, D] CLIP features of `dcm.views` -> [B, P, D] (before the projector)."""
    p, (p_h, p_w) = self.plan, self.patches
    b = feats.shape[0]
    chex.assert_shape(feats, (b, p.num_views, p_h * p_w, self.width))
    feats = feats.astype(layers.dtype_of(self.dtype))
    if p.crops == "none":  # the LLaVA-1.5 baseline: one view, nothing to enhance or merge
      out = feats[:, 0]
    elif p.reduced:
      out = self._reduced(feats[:, :p.num_local], feats[:, p.num_local])
    else:
      maps = self._maps(feats[:, :p.num_local],
                        feats[:, p.num_local:p.num_local + len(p.global_phases)])
      out = reduce_tokens(maps, self.patches, self.reduction)
    if p.crops != "none" and self.merge == "mean":
      out = 0.5 * (feats[:, p.low] + out)
    elif p.crops != "none" and self.merge == "add":
      out = feats[:, p.low] + out
    chex.assert_shape(out, (b, p_h * p_w, self.width))
    return nn.with_logical_constraint(out, ACT_AXES)

  def _attend(self, query: jax.Array, kv: jax.Array) -> jax.Array:
    """All windows in one attention call: [B, S, Tq, D], [B, S, Tk, D] -> [B, S, Tq, D]."""
    b, s, t_q, d = query.shape
    out = self.attention(query.reshape(b * s, t_q, d), kv.reshape(b * s, -1, d))
    return out.reshape(b, s, t_q, d)

  def _fuse(self, local: jax.Array, glob: jax.Array) -> jax.Array:
    """Per-token fusion of Lenh and Genh (docs/fidelity.md#fusion); any leading shape, [..., D]."""
    z = local + glob
    if self.fusion == "concat":
      z = jnp.concatenate([self.mlp_local(local), self.mlp_global(glob)], axis=-1) + z
    return self.fuse_norm(z)

  def _maps(self, f_loc: jax.Array, f_glob: jax.Array) -> jax.Array:
    """The literal path up to the fused map Z [B, H, W, D], from [B, S, P, D] features."""
    grid, patches = self.plan.grid, self.patches
    if self.plan.crops == "local":
      return combine_local(f_loc, grid, patches)
    if self.plan.crops == "global":
      return combine_global(f_glob, grid, patches)
    local, glob = combine_local(f_loc, grid, patches), combine_global(f_glob, grid, patches)
    local_enh, glob_enh = local, glob
    if self.enhance in ("both", "global"):  # branch A: global queries, local block K/V
      glob_enh = combine_local(self._attend(block_windows(glob, grid), f_loc), grid, patches)
    if self.enhance in ("both", "local"):  # branch B: local queries, global phase K/V
      local_enh = combine_global(self._attend(stride_windows(local, grid), f_glob), grid,
                                 patches)
    return self._fuse(local_enh, glob_enh)

  def _reduced(self, f_loc: jax.Array, f_centre: jax.Array) -> jax.Array:
    """The exact reduced path (docs/fidelity.md#unused-global-crops): [B, S, P, D] local, [B, P, D] centre global -> [B, P, D].

    Evaluates L, G, Lenh, Genh and Z only at the positions the bilinear pick keeps.
    """
    b, s, t, d = f_loc.shape
    local_idx, group, slot = reduced_index(self.plan.grid, self.patches)
    local = jnp.take(f_loc.reshape(b, s * t, d), local_idx, axis=1)  # L at kept positions
    glob = f_centre  # G at kept positions is the centre phase itself
    local_enh, glob_enh = local, glob
    if self.enhance in ("both", "global"):
      queries = jnp.take(glob, group.ravel(), axis=1).reshape(b, s, -1, d)
      grouped = self._attend(queries, f_loc).reshape(b, -1, d)
      glob_enh = jnp.take(grouped, slot, axis=1)
    if self.enhance in ("both", "local"):
      local_enh = self._attend(local[:, None], f_centre[:, None])[:, 0]
    return self._fuse(local_enh, glob_enh)
