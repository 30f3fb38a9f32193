"""The Dual-perspective Cropping Module (paper §4.2, eqs. 9-17; docs/fidelity.md#crop-grid): pixels -> the sub-images CLIP sees.

Everything here is a parameter-free index map or resampling, on channels-last arrays
`[B, H, W, C]`. A high-res image of side `N_h*h x N_w*w` is cut two ways (paper eqs. 9-17):

  local k = N_w*bi + bj:   Loc_k[y, x]  = I[h*bi + y, w*bj + x]      (contiguous blocks)
  global k = N_w*gh + gw:  Glob_k[y, x] = I[N_h*y + gh, N_w*x + gw]  (stride-N phases)

Example, a 4x4 image holding `4r + c` on a 2x2 grid (tests/model/test_dcm.py; docs/fidelity.md#test-vectors):
  local  k=0..3: [[0,1],[4,5]]  [[2,3],[6,7]]  [[8,9],[12,13]]  [[10,11],[14,15]]
  global k=0..3: [[0,2],[8,10]] [[1,3],[9,11]] [[4,6],[12,14]]  [[5,7],[13,15]]

The low-res view is PyTorch's bicubic resize (A = -0.75, align_corners=False, no antialias)
to the view size. For an odd integer ratio n it is exactly the centre phase `I[(n-1)/2::n]`,
i.e. global crop k = (S-1)/2 (docs/fidelity.md#low-res-view), and is then reused instead of encoded twice.

`views(pixels, model_cfg)` stacks the sub-images one model configuration needs in the order
its `ViewPlan` names; the DEM (`dem.py`) reads its features back by the same plan.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

CROPS = ("dual", "local", "global", "none")
ENHANCE = ("both", "global", "local", "none")
REDUCTIONS = ("bilinear", "avg")
MERGES = ("mean", "add", "none")
CUBIC_A = -0.75  # PyTorch's bicubic coefficient (and PIL's is -0.5: not this one)


# ----------------------------------------------------------------------------- index maps


def grid_shape(height: int, width: int, view: tuple[int, int]) -> tuple[int, int]:
  """(N_h, N_w) = (floor(H / h), floor(W / w)), paper eqs. 9-10 and 14-15."""
  n_h, n_w = height // view[0], width // view[1]
  if n_h < 1 or n_w < 1:
    raise ValueError(f"image {height}x{width} is smaller than one view {view[0]}x{view[1]}")
  return n_h, n_w


def local_crops(pixels: jax.Array, view: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, S, h, w, C]: contiguous blocks, k = N_w*row + col (paper eqs. 11-13).

  Pixels past the last whole view (H - N_h*h rows, W - N_w*w columns) are dropped.
  """
  b, height, width, c = pixels.shape
  (n_h, n_w), (h, w) = grid_shape(height, width, view), view
  x = pixels[:, :n_h * h, :n_w * w]
  x = x.reshape(b, n_h, h, n_w, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, n_h * n_w, h, w, c)


def global_crops(pixels: jax.Array, view: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, S, h, w, C]: stride-N phases, k = N_w*gh + gw (paper eqs. 16-17)."""
  b, height, width, c = pixels.shape
  (n_h, n_w), (h, w) = grid_shape(height, width, view), view
  x = pixels[:, :n_h * h, :n_w * w]
  x = x.reshape(b, h, n_h, w, n_w, c).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, n_h * n_w, h, w, c)


def global_crop(pixels: jax.Array, view: tuple[int, int], k: int) -> jax.Array:
  """[B, H, W, C] -> [B, h, w, C]: global crop k alone, one strided slice."""
  (n_h, n_w), (h, w) = grid_shape(pixels.shape[1], pixels.shape[2], view), view
  gh, gw = divmod(k, n_w)
  return pixels[:, gh:n_h * h:n_h, gw:n_w * w:n_w]


def centre_phase(grid: tuple[int, int]) -> int:
  """k of the global crop that equals the low-res view (odd grids only): 4 on a 3x3 grid."""
  n_h, n_w = grid
  if n_h % 2 == 0 or n_w % 2 == 0:
    raise ValueError(f"grid {n_h}x{n_w} has no centre phase: both sides must be odd")
  return n_w * (n_h // 2) + n_w // 2


# ----------------------------------------------------------------------------- resampling


def _fma32(a, b, c) -> np.ndarray:
  """float32 fused multiply-add: a*b + c rounded once (the product of two float32 is exact in
  float64)."""
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """PyTorch's `get_cubic_upsample_coefficients` in float32, with the fused multiply-adds its
  compiled kernel uses (within 1 ulp of it): taps at offsets -1, 0, 1, 2. [O] -> [O, 4]."""
  a = np.float32(CUBIC_A)
  near = lambda x: _fma32((_fma32(a + 2, x, -(a + 3)) * x).astype(np.float32), x, 1)
  far = lambda x: _fma32(_fma32(_fma32(a, x, -5 * a), x, 8 * a), x, -4 * a)
  one, two = np.float32(1), np.float32(2)
  return np.stack([far(t + one), near(t), near(one - t), far(two - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def interpolation_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """[out, in] float32 matrix M with `resize(x) = M @ x` along one axis, as PyTorch computes it.

  `method`: "bicubic" or "bilinear", both align_corners=False without antialiasing. The source
  coordinate `scale * (dst + 0.5) - 0.5` uses PyTorch's float32 scale and is rounded to float32
  once, as its kernel's fused multiply-add does (two roundings move some bicubic weights of
  336 -> 1008 by 2e-5). Out-of-range taps are clamped to the border, so their weights add up
  on the edge pixel.
  """
  scale = np.float64(np.float32(in_size / out_size))
  dst = np.arange(out_size)
  src = (scale * (dst + 0.5) - 0.5).astype(np.float32)
  if method == "bicubic":
    # Weights in float32 as well: then 1 - t rounds to 1 for a tiny t, so the 336 -> 1008 ->
    # 336 round trip stays exact as in PyTorch (docs/fidelity.md#torch-resampling).
    first = np.floor(src)
    weights = _cubic_weights(src - first)
    taps = first.astype(np.int64)[:, None] + np.arange(-1, 3)
  elif method == "bilinear":
    src = np.maximum(src, 0)  # PyTorch clamps negative sources for linear modes only
    first = np.floor(src)
    weights = np.stack([1 - (src - first), src - first], axis=-1)
    taps = first.astype(np.int64)[:, None] + np.arange(2)
  else:
    raise ValueError(f"interpolation method {method!r}; expected 'bicubic' or 'bilinear'")
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.repeat(dst, taps.shape[1]),
                     np.clip(taps, 0, in_size - 1).ravel()), weights.ravel())
  return matrix.astype(np.float32)


def _resize_axis(x: jax.Array, axis: int, out_size: int, method: str) -> jax.Array:
  """Resizes one axis of a float32 array; integer down-ratios are exact slices."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x  # both kernels reduce to the identity (docs/fidelity.md#torch-resampling)
  ratio = in_size // out_size
  pick = lambda start: jax.lax.slice_in_dim(x, start, start + ratio * (out_size - 1) + 1,
                                            ratio, axis)
  if ratio * out_size == in_size and ratio % 2 == 1:
    # Source coordinate ratio*i + (ratio-1)/2 is an integer: every other tap weighs 0.
    return pick(ratio // 2)
  if ratio * out_size == in_size and method == "bilinear":
    # Source falls halfway between the two middle pixels of each window: weights 0.5, 0.5.
    return 0.5 * pick(ratio // 2 - 1) + 0.5 * pick(ratio // 2)
  matrix = jnp.asarray(interpolation_matrix(in_size, out_size, method))
  y = jnp.tensordot(matrix, x, axes=[[1], [axis]], precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, 0, axis)


def resize(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  """[B, H, W, C] -> [B, h, w, C], equal to PyTorch's `F.interpolate(mode=method,
  align_corners=False)` on the NCHW transpose. Computed in float32 and cast back, as the
  reference does (docs/fidelity.md#torch-resampling). Width first, then height, in PyTorch's order of summation.
  """
  y = _resize_axis(x.astype(jnp.float32), 2, size[1], method)
  return _resize_axis(y, 1, size[0], method).astype(x.dtype)


# ----------------------------------------------------------------------------- view plan


@dataclasses.dataclass(frozen=True)
class ViewPlan:
  """Which sub-images `views` stacks, in order, and where the DEM finds each.

  Views are `[local crops k = 0..S-1 if num_local] + [global crops k in global_phases]
  + [a separately resized low-res view if it is not one of those]`.

  Attributes:
    crops: model.dcm.crops.
    grid: (N_h, N_w) sub-images per side of the high-res image.
    view: (h, w) pixels of one view (the CLIP input).
    num_local: S or 0.
    global_phases: phases k of the global crops that are stacked, in stack order.
    low: index into the stack of the low-res view, or None (merge="none").
    reduced: the DEM takes the exact reduced path (docs/fidelity.md#unused-global-crops).
  """
  crops: str
  grid: tuple[int, int]
  view: tuple[int, int]
  num_local: int
  global_phases: tuple[int, ...]
  low: int | None
  reduced: bool

  @property
  def num_views(self) -> int:
    stacked = self.num_local + len(self.global_phases)
    return stacked + (1 if self.low == stacked else 0)

  @property
  def separate_low(self) -> bool:
    """The low-res view is its own resize, not a reused global crop."""
    return self.low is not None and self.low == self.num_local + len(self.global_phases)


def choice(model_cfg: ConfigDict, field: str, allowed: tuple) -> object:
  """`model_cfg.<field>` (e.g. "dem.merge"), checked against `allowed`; ValueError names both."""
  value = model_cfg
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r}; expected one of {list(allowed)}")
  return value


def plan(model_cfg: ConfigDict) -> ViewPlan:
  """The view plan of a model config (reads model.vision, model.dcm and model.dem).

  The reduced path applies when it is exact: dual crops, bilinear reduction and an odd grid
  (for any `dem.enhance`, since fusion is per token). Then only the S local crops and the
  centre global crop (also the low-res view) are encoded: S + 1 views instead of 2S (+1).
  """
  crops = choice(model_cfg, "dcm.crops", CROPS)
  enhance = choice(model_cfg, "dem.enhance", ENHANCE)
  reduction = choice(model_cfg, "dem.reduction", REDUCTIONS)
  merge = choice(model_cfg, "dem.merge", MERGES)
  side, image = model_cfg.vision.image_size, model_cfg.dcm.image_size
  if image < side or image % side:
    raise ValueError(f"model.dcm.image_size={image} is not a multiple of "
                     f"model.vision.image_size={side}")
  if crops in ("local", "global", "none") and enhance != "none":
    raise ValueError(f"model.dem.enhance={enhance!r} needs both perspectives, but "
                     f"model.dcm.crops={crops!r}; use model.dem.enhance='none'")
  grid, view = (image // side,) * 2, (side, side)
  odd = grid[0] % 2 == 1 and grid[1] % 2 == 1
  if crops == "none":
    return ViewPlan(crops, grid, view, 0, (), 0, False)
  num_local = grid[0] * grid[1] if crops in ("dual", "local") else 0
  reduced = crops == "dual" and model_cfg.dem.reduced_path and reduction == "bilinear" and odd
  if reduced:
    phases = (centre_phase(grid),)
  elif crops in ("dual", "global"):
    phases = tuple(range(grid[0] * grid[1]))
  else:
    phases = ()
  if merge == "none":
    low = None
  elif odd and phases:
    low = num_local + phases.index(centre_phase(grid))
  else:
    low = num_local + len(phases)
  return ViewPlan(crops, grid, view, num_local, phases, low, reduced)


def num_views(model_cfg: ConfigDict) -> int:
  """V, the sub-images per image sent through CLIP (10 for the released model, 19 -> 18 literal)."""
  return plan(model_cfg).num_views


def views(pixels: jax.Array, model_cfg: ConfigDict) -> jax.Array:
  """[B, H, W, C] -> [B, V, h, w, C], the CLIP inputs in `plan(model_cfg)` order.

  `pixels` are CLIP-normalised. If (H, W) differs from model.dcm.image_size they are first
  resized bicubically to it, as `encode_images` does (docs/fidelity.md#inference-resolution; e.g. 336 processor output
  seen by a 1008 model); at the model's own size that resize is the identity and skipped.
  """
  p = plan(model_cfg)
  b, _, _, c = pixels.shape
  image = model_cfg.dcm.image_size
  pixels = resize(pixels, (image, image), "bicubic")
  stack = []
  if p.num_local:
    stack.append(local_crops(pixels, p.view))
  if p.global_phases:
    if len(p.global_phases) == p.grid[0] * p.grid[1]:
      stack.append(global_crops(pixels, p.view))
    else:  # the reduced path: one strided slice instead of all S phases
      stack += [global_crop(pixels, p.view, k)[:, None] for k in p.global_phases]
  if p.separate_low:
    stack.append(resize(pixels, p.view, "bicubic")[:, None])
  out = jnp.concatenate(stack, axis=1) if len(stack) > 1 else stack[0]
  chex.assert_shape(out, (b, p.num_views, *p.view, c))
  return out
