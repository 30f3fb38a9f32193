"""S2, Scaling on Scales (Shi et al. 2024, arXiv 2403.13043): one CLIP on an image at several scales.

The `s2` variant is LLaVA-1.5 with its vision tower wrapped by the S2-Wrapper, as LLaVA's
`CLIPVisionTowerS2` uses it (`multiscale_forward(tower, images, img_sizes=scales,
max_split_size=scales[0])`, scales sorted ascending). For an input image of side `scales[-1]`
(the CLIP processor resizes and crops to the largest scale) and each scale s, in that order:

  1. resize the input to s x s: PyTorch bicubic, align_corners=False, no antialias, in float32
     (`dcm.resize`; at s = the input side it is the identity);
  2. cut it into n x n = (s / view)^2 tiles of the CLIP view size, row-major (the wrapper's
     `split_chessboard`, `dcm.local_crops` here);
  3. run CLIP on every tile: [n*n, g*g, D] patch features (g = view / patch, 24 for CLIP-L/14-336);
  4. lay the tiles' maps back on the n x n grid, one [n*g, n*g, D] map (`merge_chessboard`);
  5. pool it by area (`F.interpolate(mode="area")`, a mean over n x n blocks at these integer
     ratios) to the first scale's g x g grid.

The scales' maps are concatenated on channels in scale order, [g*g, len(scales) * D], and go
to the projector: 576 tokens of 3 x 1024 for the default (336, 672, 1008). Scales must be
multiples of the view size with the smallest equal to it (the wrapper resizes other sizes up to
a whole number of tiles, then its features back: not supported here), and CLIP's CLS token is
dropped (`vision.feature_select="patch"`, as LLaVA's S2 tower).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn
from ml_collections import ConfigDict

from infllava_jax.errors import ConfigError
from infllava_jax.model import dcm


def scales(model_cfg: ConfigDict) -> tuple[int, ...]:
  """`model.s2.scales`, sorted ascending as the reference sorts them, checked against the view.

  Raises ConfigError naming the field when a scale is not a multiple of `vision.image_size`,
  the smallest differs from it, or the features keep CLIP's CLS token.
  """
  view = model_cfg.vision.image_size
  sides = tuple(sorted(int(s) for s in model_cfg.s2.scales))
  if not sides or sides[0] != view or any(s % view for s in sides):
    raise ConfigError(f"model.s2.scales={list(model_cfg.s2.scales)}; expected multiples of "
                      f"model.vision.image_size={view}, the smallest equal to it")
  if model_cfg.vision.feature_select != "patch":
    raise ConfigError(f"model.vision.feature_select={model_cfg.vision.feature_select!r}; the "
                      "s2 variant pools patch maps and needs 'patch'")
  return sides


def input_size(model_cfg: ConfigDict) -> int:
  """The side images are preprocessed to: the largest scale (1008 for the default scales)."""
  return scales(model_cfg)[-1]


def tiles_per_scale(model_cfg: ConfigDict) -> tuple[int, ...]:
  """n per scale, the tiles per side: (1, 2, 3) for (336, 672, 1008)."""
  view = model_cfg.vision.image_size
  return tuple(s // view for s in scales(model_cfg))


def num_views(model_cfg: ConfigDict) -> int:
  """V, the CLIP inputs per image: sum of n^2 over the scales (1 + 4 + 9 = 14 by default)."""
  return sum(n * n for n in tiles_per_scale(model_cfg))


def feature_width(model_cfg: ConfigDict) -> int:
  """Channels per visual token before the projector: len(scales) * vision.width (3072)."""
  return len(scales(model_cfg)) * model_cfg.vision.width


def views(pixels: jax.Array, model_cfg: ConfigDict) -> jax.Array:
  """[B, H, W, C] at `input_size` -> [B, V, h, w, C]: each scale's tiles, scale by scale."""
  view = model_cfg.vision.image_size
  stack = [dcm.local_crops(dcm.resize(pixels, (side, side), "bicubic"), (view, view))
           for side in scales(model_cfg)]
  out = jnp.concatenate(stack, axis=1)
  chex.assert_shape(out, (pixels.shape[0], num_views(model_cfg), view, view, pixels.shape[3]))
  return out


def merge_tiles(features: jax.Array, n: int) -> jax.Array:
  """[B, n*n, g, g, D] tile maps (row-major tiles) -> [B, n*g, n*g, D], the inverse of the cut."""
  b, _, g, _, d = features.shape
  x = features.reshape(b, n, n, g, g, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, n * g, n * g, d)


def merge(view_features: jax.Array, model_cfg: ConfigDict) -> jax.Array:
  """[B, V, g*g, D] CLIP features of `views` -> [B, g*g, len(scales) * D].

  Per scale: tiles merged into one map, area-pooled to g x g; then channels concatenated.
  """
  b, _, tokens, d = view_features.shape
  d_type = view_features.dtype
  g = model_cfg.vision.image_size // model_cfg.vision.patch_size
  chex.assert_shape(view_features, (b, num_views(model_cfg), g * g, d))
  maps, start = [], 0
  for n in tiles_per_scale(model_cfg):
    tiles = view_features[:, start:start + n * n].reshape(b, n * n, g, g, d)
    start += n * n
    merged = merge_tiles(tiles, n)
    if n > 1:  # in float32 and back, as the reference's interpolate
      merged = nn.avg_pool(merged.astype(jnp.float32), (n, n), strides=(n, n)).astype(d_type)
    maps.append(merged)
  return jnp.concatenate(maps, axis=-1).reshape(b, tokens, len(maps) * d)
