"""Image preprocessing on the host (docs/fidelity.md#processor-resolution): decode → RGB → square → resize → CLIP.

Bit-for-bit the same float32 as `transformers.CLIPImageProcessor` with size and crop size
set to the model's resolution (the reference's ×3), applied to a PIL image already
converted to RGB as the reference dataset does. Resizing is Pillow's BICUBIC (it
antialiases when shrinking), not a JAX resize, for pixel parity.
"""

from __future__ import annotations

import io
import os

import numpy as np
from etils import epath
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# expand2square background: tuple(int(255 * m) for m in mean) = (122, 116, 104).
PAD_COLOUR = tuple(int(255 * m) for m in CLIP_MEAN)


class ImageError(ValueError):
  """An image that cannot be read or decoded; the message says which and why."""


def decode(image) -> Image.Image:
  """A path (local or on a bucket), encoded bytes, a uint8 [H, W, C] array or a PIL image →
  RGB PIL image.

  Any mode (L, P, RGBA, CMYK, I;16...) becomes RGB with Pillow's `convert("RGB")`, as the
  reference's `Image.open(path).convert('RGB')`. Like it, the pixels are taken as stored: an
  EXIF orientation tag (a phone photo's rotation) is not applied, so training, evaluation
  and the released weights see the same layout.
  """
  try:
    if isinstance(image, Image.Image):
      pil = image
    elif isinstance(image, np.ndarray):
      pil = Image.fromarray(image)
    elif isinstance(image, (bytes, bytearray)):
      pil = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
      path = epath.Path(image)  # a local file, or gs:// and the other etils.epath paths
      if not path.is_file():
        raise ImageError(f"image file {os.fspath(image)!r} not found")
      pil = Image.open(io.BytesIO(path.read_bytes()))
    else:
      raise ImageError(f"unsupported image value of type {type(image).__name__}")
    pil.load()
    return pil if pil.mode == "RGB" else pil.convert("RGB")
  except ImageError:
    raise
  except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError...).
    where = f" {os.fspath(image)!r}" if isinstance(image, (str, os.PathLike)) else ""
    raise ImageError(f"cannot decode image{where}: {type(e).__name__}: {e}") from e


def expand_to_square(image: Image.Image, colour=PAD_COLOUR) -> Image.Image:
  """LLaVA's expand2square: the image pasted centred on a square of the mean colour."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  square = Image.new(image.mode, (side, side), colour)
  square.paste(image, ((side - width) // 2, (side - height) // 2))
  return square


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
  """Shortest edge → `size` (long edge truncated), PIL bicubic, centre crop. uint8 [S, S, 3]."""
  width, height = image.size
  if width <= height:
    new = (size, int(size * height / width))
  else:
    new = (int(size * width / height), size)
  pixels = np.asarray(image.resize(new, resample=Image.Resampling.BICUBIC))
  top = (new[1] - size) // 2
  left = (new[0] - size) // 2
  return pixels[top:top + size, left:left + size]


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] → CLIP-normalised float32, in CLIPImageProcessor's order of operations."""
  scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  return (scaled - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(image, size: int, aspect: str = "pad") -> np.ndarray:
  """Any image input → float32 [S, S, 3], CLIP-normalised.

  aspect: "pad" (stage 2, inference: expand to square with the mean colour) or "square"
  (stage 1: shortest-edge resize and centre crop, which cuts the long side).
  """
  if aspect not in ("pad", "square"):
    raise ValueError(f"data.image_aspect must be 'pad' or 'square', got {aspect!r}")
  pil = decode(image)
  if aspect == "pad":
    pil = expand_to_square(pil)
  return normalize(resize_and_crop(pil, size))


def zero_image(size: int) -> np.ndarray:
  """The image of a text-only sample: zeros in normalised space, float32 [S, S, 3]."""
  return np.zeros((size, size, 3), np.float32)
