"""LLaVA-NeXT's AnyRes image processing on the host (`model.variant = "llava_next"`).

Bit-for-bit the float32 of `transformers`' LlavaNextImageProcessor (its PIL path, the one
used without torchvision) with size and crop size at the tile side: the best grid pinpoint
for the image (`model.anyres.select_best_resolution`), an aspect-preserving Pillow bicubic
resize into it (the long side fills it, the short one rounded up), zero padding centred
(the odd pixel after), tiles row-major, and first the whole image squashed to one tile.
The model's side of AnyRes is `infllava_jax/model/anyres.py`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from infllava_jax.data import images
from infllava_jax.model import anyres


def resize_and_pad(image: Image.Image, height: int, width: int) -> np.ndarray:
  """The image scaled to fit `height` x `width` (aspect kept), centred on zeros. uint8."""
  scale_w, scale_h = width / image.width, height / image.height
  if scale_w < scale_h:
    new_w, new_h = width, min(math.ceil(image.height * scale_w), height)
  else:
    new_w, new_h = min(math.ceil(image.width * scale_h), width), height
  resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
  top, left = (height - new_h) // 2, (width - new_w) // 2
  canvas = np.zeros((height, width, 3), np.uint8)
  canvas[top:top + new_h, left:left + new_w] = resized
  return canvas


def preprocess(image: Any, model_cfg: ConfigDict) -> tuple[np.ndarray, anyres.Layout]:
  """Any image input (as `images.decode` takes) -> (tiles, layout).

  tiles: [1 + rows * cols, S, S, 3] float32 CLIP-normalised, the base view first; S is
  `vision.image_size`.
  """
  pil = images.decode(image)
  tile = model_cfg.vision.image_size
  grid_h, grid_w = anyres.select_best_resolution(pil.height, pil.width,
                                                 anyres.pinpoints(model_cfg))
  canvas = resize_and_pad(pil, grid_h, grid_w)
  grid = (canvas.reshape(grid_h // tile, tile, grid_w // tile, tile, 3)
          .transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3))
  base = np.asarray(pil.resize((tile, tile), resample=Image.Resampling.BICUBIC))
  tiles = images.normalize(np.concatenate([base[None], grid]))
  return tiles, anyres.layout(pil.height, pil.width, model_cfg)


def image_inputs(image_list: Sequence[Any], model_cfg: ConfigDict
                 ) -> tuple[dict[str, np.ndarray], list[int]]:
  """The model's `pixels` for N images (None: no image), and each one's token count.

  Returns ({"tiles": [N, 1 + max_tiles, S, S, 3] float32 (zeros past an image's tiles),
  "layout": [N, 4] int32}, [count per image, 0 for None]).
  """
  tile = model_cfg.vision.image_size
  tiles = np.zeros((len(image_list), 1 + anyres.max_tiles(model_cfg), tile, tile, 3),
                   np.float32)
  layouts = np.zeros((len(image_list), 4), np.int32)
  for i, image in enumerate(image_list):
    if image is not None:
      image_tiles, layouts[i] = preprocess(image, model_cfg)
      tiles[i, :len(image_tiles)] = image_tiles
  counts = [anyres.count(anyres.Layout(*map(int, row)), model_cfg) for row in layouts]
  return {"tiles": tiles, "layout": layouts}, counts
