"""LLaVA-NeXT's AnyRes (`model.variant = "llava_next"`): a grid of CLIP tiles chosen per image.

An image of H x W is resized into the best-fitting resolution of `model.anyres.grid_pinpoints`
(`select_best_resolution`), padded to it and cut into `vision.image_size` tiles; a base view
of the whole image comes first. CLIP + projector run on every tile; the tiles' features are
laid back on the grid, the rows or columns that hold only padding are cut away to the
original aspect (`spatial_unpad`), and a learned `image_newline` follows each row. An image
gives `num_image_tokens(H, W, cfg)` tokens: the base view's P, then rows x (cols + 1).
This is `transformers`' LlavaNextImageProcessor + LlavaNextForConditionalGeneration
(`pack_image_features`, `unpad_image`), number for number.

Static shapes: pad to the largest with a count. Every image has `1 + max_tiles(cfg)` tile
slots (unused ones are zeros) and its `Layout` (grid and kept feature rows/columns, four
int32) computed on the host by `layout`; the model gathers each image's tokens into
`max_image_tokens(cfg)` positions and writes the first `count` of them into the row's image
slots. One program serves every mix of aspect ratios (a batch of a wide, a tall and a square
image compiles once, as does a batch of any other three), where bucketing by grid would
compile one program per combination of grids in a batch (5 grids, M images per row: up to
5^M per batch shape) and split batches by shape. The price is CLIP on padding tiles: with
the 8B pinpoints, 5 tiles per image where a 1 x 2 grid needs 3.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict


class Layout(NamedTuple):
  """Where an image's tokens come from, in feature units (one per CLIP patch).

  rows, cols: the tile grid (0, 0 for an absent image). kept_rows, kept_cols: the unpadded
  feature map, centred in the (rows * side) x (cols * side) grid of features.
  """
  rows: int
  cols: int
  kept_rows: int
  kept_cols: int


def pinpoints(model_cfg: ConfigDict) -> tuple[tuple[int, int], ...]:
  """`model.anyres.grid_pinpoints` as (height, width) pairs, each a multiple of the tile."""
  tile = model_cfg.vision.image_size
  points = tuple((int(h), int(w)) for h, w in model_cfg.anyres.grid_pinpoints)
  bad = [p for p in points if p[0] % tile or p[1] % tile or min(p) <= 0]
  if not points or bad:
    raise ValueError(f"model.anyres.grid_pinpoints={list(points)}: expected (height, width) "
                     f"pairs, positive multiples of vision.image_size {tile}")
  return points


def select_best_resolution(height: int, width: int,
                           candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The (height, width) candidate that keeps most of the image's pixels once it is scaled
  to fit, then wastes the least area (the first such on a tie), as LLaVA-NeXT chooses."""
  best, best_effective, best_wasted = None, 0, float("inf")
  for cand_h, cand_w in candidates:
    scale = min(cand_w / width, cand_h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = cand_w * cand_h - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (cand_h, cand_w), effective, wasted
  return best


def feature_side(model_cfg: ConfigDict) -> int:
  """Patches along one side of a tile: 24 for CLIP-L/14-336."""
  return model_cfg.vision.image_size // model_cfg.vision.patch_size


def layout(height: int, width: int, model_cfg: ConfigDict) -> Layout:
  """The `Layout` of an image of `height` x `width` pixels (LLaVA-NeXT's `unpad_image`)."""
  tile, side = model_cfg.vision.image_size, feature_side(model_cfg)
  grid_h, grid_w = select_best_resolution(height, width, pinpoints(model_cfg))
  rows, cols = grid_h // tile, grid_w // tile
  current_h, current_w = rows * side, cols * side
  if width / height > current_w / current_h:
    new_h = int(round(height * (current_w / width), 7))
    current_h -= (current_h - new_h) // 2 * 2
  else:
    new_w = int(round(width * (current_h / height), 7))
    current_w -= (current_w - new_w) // 2 * 2
  return Layout(rows, cols, current_h, current_w)


def count(image_layout: Layout, model_cfg: ConfigDict) -> int:
  """Tokens of an image with this layout: the base view's, then each kept row + newline."""
  if not image_layout.rows:
    return 0
  return feature_side(model_cfg) ** 2 + image_layout.kept_rows * (image_layout.kept_cols + 1)


def num_image_tokens(height: int, width: int, model_cfg: ConfigDict) -> int:
  """Visual tokens (= image slots in the token ids) of an image of `height` x `width`."""
  return count(layout(height, width, model_cfg), model_cfg)


def max_tiles(model_cfg: ConfigDict) -> int:
  """Grid tiles of the largest pinpoint (4 for the 8B's 672 x 672)."""
  tile = model_cfg.vision.image_size
  return max((h // tile) * (w // tile) for h, w in pinpoints(model_cfg))


def max_grid_tokens(model_cfg: ConfigDict) -> int:
  """Grid tokens (rows x (cols + 1)) of the largest unpadded grid: 2352 for the 8B."""
  tile, side = model_cfg.vision.image_size, feature_side(model_cfg)
  return max((h // tile * side) * (w // tile * side + 1) for h, w in pinpoints(model_cfg))


def max_image_tokens(model_cfg: ConfigDict) -> int:
  """The most tokens an image can give (2928 for the 8B): the per-image buffer's length."""
  return feature_side(model_cfg) ** 2 + max_grid_tokens(model_cfg)


def pack_features(features: jax.Array, layouts: jax.Array, newline: jax.Array,
                  num_tokens: int) -> jax.Array:
  """Base view first, then the unpadded grid with a newline after each row.

  Args:
    features: [N, 1 + T, side * side, D] projected features: base view, then tiles
      row-major over the image's grid (tiles past rows * cols are padding).
    layouts: [N, 4] int32 `Layout`s.
    newline: [D] the learned `image_newline`.
    num_tokens: static length of the result (`max_grid_tokens(cfg)`).
  Returns:
    [N, side * side + num_tokens, D]: an image's first `count` positions are its tokens.
  """
  n, tiles, patches, dim = features.shape
  side = int(round(patches ** 0.5))
  rows, cols, kept_rows, kept_cols = (layouts[:, i, None] for i in range(4))  # [N, 1]
  t = jnp.arange(num_tokens)[None]
  line, x = t // (kept_cols + 1), t % (kept_cols + 1)
  y = line + (rows * side - kept_rows) // 2
  x_grid = x + (cols * side - kept_cols) // 2
  tile = (y // side) * cols + x_grid // side
  index = jnp.clip(tile * patches + (y % side) * side + x_grid % side, 0,
                   (tiles - 1) * patches - 1)
  grid = features[:, 1:].reshape(n, (tiles - 1) * patches, dim)
  gathered = jnp.take_along_axis(grid, index[..., None], axis=1)  # [N, num_tokens, D]
  tokens = jnp.where((x == kept_cols)[..., None], newline.astype(gathered.dtype), gathered)
  tokens = jnp.where((line < kept_rows)[..., None], tokens, 0)
  return jnp.concatenate([features[:, 0], tokens], axis=1)


def counts(layouts: jax.Array, side: int) -> jax.Array:
  """`count` on device: [..., 4] int32 layouts -> [...] int32 tokens per image."""
  rows, kept_rows, kept_cols = layouts[..., 0], layouts[..., 2], layouts[..., 3]
  return jnp.where(rows > 0, side * side + kept_rows * (kept_cols + 1), 0)


def write_image_tokens(text_embeds: jax.Array, is_slot: jax.Array, visual: jax.Array,
                       image_counts: jax.Array) -> jax.Array:
  """Puts each image's first `count` tokens into the row's image slots, image by image.

  Args:
    text_embeds: [B, T, D] token embeddings.
    is_slot: [B, T] bool, True at image slots (the row's images' counts, in order).
    visual: [B, M, N, D] each image's tokens, padded to N.
    image_counts: [B, M] int32 tokens per image (0 for an absent one).
  Returns:
    [B, T, D]
  """
  batch, images, length, dim = visual.shape
  rank = jnp.cumsum(is_slot.astype(jnp.int32), axis=1) - 1  # slot number in its row
  ends = jnp.cumsum(image_counts, axis=1)
  image = jnp.minimum(jnp.sum(rank[..., None] >= ends[:, None, :], axis=-1), images - 1)
  start = jnp.take_along_axis(ends - image_counts, image, axis=1)
  index = image * length + jnp.clip(rank - start, 0, length - 1)
  gathered = jnp.take_along_axis(visual.reshape(batch, images * length, dim), index[..., None],
                                 axis=1)
  return jnp.where(is_slot[..., None], gathered.astype(text_embeds.dtype), text_embeds)
