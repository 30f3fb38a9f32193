"""The full INF-LLaVA model: DCM -> CLIP -> DEM -> projector -> LLaMA with visual tokens in slots.

Static shapes end to end: every image gives `num_image_tokens(cfg)` visual tokens, the data
side reserves exactly that many slots (the id `cfg.image_token_id`) per image in the token
ids, and the model writes the k-th image's tokens into the k-th block of slots of its row.
Nothing on device depends on a Python-side length. The "llava_next" variant (LLaVA-NeXT's
AnyRes, `model/anyres.py`) gives each image its own count, padded to the largest on device.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn
from ml_collections import ConfigDict, FrozenConfigDict

from infllava_jax.model import anyres, clip, dcm, dem, kv_cache, layers, llama, s2
from infllava_jax.model.projector import Projector

VARIANTS = ("infllava", "llava", "llava_next", "s2")


def num_image_tokens(model_cfg: ConfigDict) -> int:
  """N_img, the visual tokens (= image slots in the token ids) per image.

  The DEM reduces its high-res maps back to one view's patch grid, and S2 pools its scales
  to it, so the INF-LLaVA, LLaVA-1.5 and S2 variants all give (view side / patch)^2 tokens:
  576 for the released model. An AnyRes image's count depends on its size:
  `anyres.num_image_tokens(H, W, cfg)`.
  """
  if model_cfg.variant == "llava_next":
    raise ValueError("model.variant='llava_next' gives each image its own number of visual "
                     "tokens: anyres.num_image_tokens(height, width, model_cfg)")
  side = model_cfg.vision.image_size // model_cfg.vision.patch_size
  return side * side


def write_image_tokens(text_embeds: jax.Array, is_slot: jax.Array,
                       visual: jax.Array) -> jax.Array:
  """Puts visual tokens into the image slots of a row, in order.

  The j-th slot of row b (counting slots from the row's start) takes `visual[b, j]`:
  with N_img slots per image, the k-th block of slots gets the k-th image of the row.
  A row with more slots than visual tokens is a data error the pipeline rules out.

  Args:
    text_embeds: [B, T, D] token embeddings (slots hold an arbitrary embedding).
    is_slot: [B, T] bool, True at image slots.
    visual: [B, M * N_img, D] the row's visual tokens, image by image.
  Returns:
    [B, T, D]
  """
  slot_index = jnp.cumsum(is_slot.astype(jnp.int32), axis=1) - 1
  slot_index = jnp.clip(slot_index, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, slot_index[..., None], axis=1)
  return jnp.where(is_slot[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class InfLlava(nn.Module):
  """INF-LLaVA (or, with `variant="llava"`, the LLaVA-1.5 baseline; `"s2"`, LLaVA-1.5 with
  S2's multi-scale CLIP features, `s2.py`) on one code path.

  Attributes:
    cfg: the `config.model` section (see infllava_jax/presets/infllava_8b.py), frozen.
    llm_scan_layers: the language model's `scan_layers` (True: the checkpoint layout; False:
      unrolled layers over `llama.unstack_layers` params, for decoding).
  """

  cfg: FrozenConfigDict
  llm_scan_layers: bool = True

  def setup(self):
    cfg = self.cfg
    if cfg.variant not in VARIANTS:
      raise ValueError(f"model.variant={cfg.variant!r}; expected one of {VARIANTS}")
    dtype = layers.dtype_of(cfg.dtype)
    self.vision = clip.VisionTransformer(cfg.vision, dtype=dtype,
                                         remat_policy=cfg.remat_policy,
                                         attention_impl=cfg.attention_impl)
    if cfg.variant == "infllava":
      self.dem = dem.DualPerspectiveEnhancement.from_config(cfg)
    if cfg.variant == "llava_next":
      if cfg.vision.feature_select != "patch":
        raise ValueError(f"model.vision.feature_select={cfg.vision.feature_select!r}: AnyRes "
                         "lays patch features on the tile grid; expected 'patch'")
      # LLaVA-NeXT's init: normal with std 1/sqrt(width).
      self.image_newline = self.param(
          "image_newline", nn.with_logical_partitioning(
              nn.initializers.normal(cfg.llm.width ** -0.5), ("embed",)),
          (cfg.llm.width,), jnp.float32)
    self.projector = Projector(cfg.llm.width, cfg.projector.kind, dtype=dtype)
    self.llm = language_model(cfg, self.llm_scan_layers)

  def encode_images(self, pixels: jax.Array) -> jax.Array:
    """[B, H, W, 3] CLIP-normalised images at `input_size(cfg)` -> [B, N_img, D] visual
    tokens. The DCM first resizes them to `dcm.image_size` if that differs."""
    cfg = self.cfg
    side = input_size(cfg)
    chex.assert_shape(pixels, (None, side, side, 3))
    batch = pixels.shape[0]
    if cfg.variant == "llava":
      features = self.vision(pixels)
    elif cfg.variant == "s2":
      views = s2.views(pixels, cfg)  # [B, V, h, w, 3]
      view_features = self.vision(views.reshape(batch * views.shape[1], *views.shape[2:]))
      features = s2.merge(view_features.reshape(batch, views.shape[1],
                                                *view_features.shape[1:]), cfg)
    else:
      views = dcm.views(pixels, cfg)  # [B, S, h, w, 3]
      num_views = views.shape[1]
      view_features = self.vision(views.reshape(batch * num_views, *views.shape[2:]))
      view_features = view_features.reshape(batch, num_views, *view_features.shape[1:])
      features = self.dem(view_features)
    chex.assert_shape(features, (batch, num_image_tokens(cfg), feature_width(cfg)))
    return self.projector(features)

  def encode_anyres(self, tiles: jax.Array, layouts: jax.Array) -> jax.Array:
    """AnyRes images -> [N, anyres.max_image_tokens(cfg), D] visual tokens, each image's
    `anyres.counts` first (see `anyres.pack_features`).

    tiles: [N, 1 + T, S, S, 3] CLIP-normalised, the base view first; layouts: [N, 4] int32.
    """
    cfg = self.cfg
    side = cfg.vision.image_size
    chex.assert_shape(tiles, (None, None, side, side, 3))
    num, per_image = tiles.shape[:2]
    features = self.projector(self.vision(tiles.reshape(num * per_image, side, side, 3)))
    features = features.reshape(num, per_image, *features.shape[1:])
    return anyres.pack_features(features, layouts, self.image_newline,
                                anyres.max_grid_tokens(cfg))

  def write_anyres(self, embeds: jax.Array, is_slot: jax.Array, tiles: jax.Array,
                   layouts: jax.Array) -> jax.Array:
    """`encode_anyres` of each row's M images into its slots: embeds [B, T, D], is_slot
    [B, T], tiles [B, M, 1 + T', S, S, 3], layouts [B, M, 4] -> [B, T, D]."""
    batch, num_images = tiles.shape[:2]
    visual = self.encode_anyres(tiles.reshape(batch * num_images, *tiles.shape[2:]),
                                layouts.reshape(batch * num_images, 4))
    visual = visual.reshape(batch, num_images, *visual.shape[1:])
    image_counts = anyres.counts(layouts, anyres.feature_side(self.cfg))
    return anyres.write_image_tokens(embeds, is_slot, visual, image_counts)

  def __call__(self, tokens: jax.Array, pixels: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               cache: kv_cache.KVCache | None = None, head: bool = True):
    """Logits for a batch of rows, images written into their slots.

    Args:
      tokens: [B, T] int32 ids; image slots hold `cfg.image_token_id`.
      pixels: [B, M, H, W, 3] the M images of each row (zeros where a row has fewer), or
        None (or M = 0, a text-only run's batches) for text-only input and cached decode
        steps: no vision work is traced then. For "llava_next", {"tiles": [B, M, 1 + T, S,
        S, 3], "layout": [B, M, 4] int32} (`data.anyres.image_inputs`; zero layouts where a
        row has fewer images).
      positions: [B, T] int32 (default 0..T-1); restart per packed sample.
      segment_ids: [B, T] int32, 1.. per packed sample and 0 for padding (default all 1).
      cache: a `kv_cache.KVCache` for prefill / decode, or None.
      head: False returns the LLM's final-norm hidden states [B, T, D] instead of logits
        (see `llama.Llama.__call__`).
    Returns:
      (logits [B, T, V] float32, updated cache or None)
    """
    batch, length = tokens.shape
    is_slot = tokens == self.cfg.image_token_id
    embeds = self.llm.embed(jnp.where(is_slot, 0, tokens))
    if self.cfg.variant == "llava_next":
      if pixels is not None and pixels["tiles"].shape[1]:
        embeds = self.write_anyres(embeds, is_slot, pixels["tiles"], pixels["layout"])
    elif pixels is not None:
      chex.assert_rank(pixels, 5)
      if pixels.shape[1]:
        num_images = pixels.shape[1]
        visual = self.encode_images(pixels.reshape(batch * num_images, *pixels.shape[2:]))
        visual = visual.reshape(batch, num_images * visual.shape[1], visual.shape[2])
        embeds = write_image_tokens(embeds, is_slot, visual)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return self.llm(embeds, positions, segment_ids, cache, head)


def language_model(model_cfg: ConfigDict, scan_layers: bool = True) -> llama.Llama:
  """The `llm` submodule of `InfLlava(model_cfg)` (params at `llm/...`); `scan_layers=False`
  gives the same function over `llama.unstack_layers` params."""
  return llama.Llama(model_cfg.llm, dtype=layers.dtype_of(model_cfg.dtype),
                     remat_policy=model_cfg.remat_policy,
                     attention_impl=model_cfg.attention_impl,
                     attention_chunk=model_cfg.attention_chunk,
                     # A memory layout, not the model: configs saved before it run unchunked.
                     mlp_chunks=model_cfg.get("mlp_chunks", 1), scan_layers=scan_layers)


def build_model(model_cfg: ConfigDict) -> InfLlava:
  """The model for a `config.model` section."""
  return InfLlava(FrozenConfigDict(model_cfg))


def feature_width(model_cfg: ConfigDict) -> int:
  """Channels of a visual token before the projector: CLIP's width (S2: one per scale)."""
  return s2.feature_width(model_cfg) if model_cfg.variant == "s2" else model_cfg.vision.width


def num_views(model_cfg: ConfigDict) -> int:
  """CLIP inputs per image: 1 (llava), the DCM's views (infllava), S2's tiles (s2), or the
  base view and the most tiles an image may have (llava_next: its padded tile slots)."""
  if model_cfg.variant == "llava":
    return 1
  if model_cfg.variant == "s2":
    return s2.num_views(model_cfg)
  if model_cfg.variant == "infllava":
    return dcm.num_views(model_cfg)
  if model_cfg.variant == "llava_next":  # the base view and every tile slot
    return 1 + anyres.max_tiles(model_cfg)
  raise ValueError(f"model.variant={model_cfg.variant!r}; expected one of {VARIANTS}")


def input_size(model_cfg: ConfigDict) -> int:
  """The side images are preprocessed to: `dcm.processor_size`, or else `dcm.image_size`
  (S2: its largest scale)."""
  size = model_cfg.dcm.get("processor_size") or model_cfg.dcm.image_size
  if model_cfg.variant == "s2":
    if model_cfg.dcm.get("processor_size"):
      raise ValueError(f"model.dcm.processor_size={size} applies to the infllava variant "
                       f"only; the s2 variant reads images at its largest scale "
                       f"{s2.input_size(model_cfg)}")
    return s2.input_size(model_cfg)
  if model_cfg.variant in ("llava", "llava_next") and size != model_cfg.dcm.image_size:
    raise ValueError(f"model.dcm.processor_size={size} applies to the infllava variant only; "
                     f"the {model_cfg.variant} variant reads images at dcm.image_size "
                     f"{model_cfg.dcm.image_size}")
  return size


def pixels_shapes(model_cfg: ConfigDict, rows: int, images: int):
  """`InfLlava.__call__`'s pixels for `rows` rows of `images` images, as ShapeDtypeStructs:
  [rows, images, S, S, 3] float32, or for llava_next a dict of its tiles and layouts."""
  side = input_size(model_cfg)
  if model_cfg.variant == "llava_next":
    tiles = 1 + anyres.max_tiles(model_cfg)
    return {"tiles": jax.ShapeDtypeStruct((rows, images, tiles, side, side, 3), jnp.float32),
            "layout": jax.ShapeDtypeStruct((rows, images, 4), jnp.int32)}
  return jax.ShapeDtypeStruct((rows, images, side, side, 3), jnp.float32)


def projected_tokens(model_cfg: ConfigDict) -> int:
  """Tokens per image through the projector: `num_image_tokens`, or for llava_next every
  tile slot's patches (padding tiles included, as the model computes them)."""
  if model_cfg.variant == "llava_next":
    return (1 + anyres.max_tiles(model_cfg)) * anyres.feature_side(model_cfg) ** 2
  return num_image_tokens(model_cfg)


def dummy_inputs(model_cfg: ConfigDict, batch: int = 1, length: int = 8):
  """Smallest (tokens, pixels) that trace every parameter: for init and `jax.eval_shape`."""
  side = input_size(model_cfg)
  tokens = jnp.zeros((batch, length), jnp.int32)
  if model_cfg.variant == "llava_next":
    return tokens, {"tiles": jnp.zeros((batch, 1, 2, side, side, 3), jnp.float32),
                    "layout": jnp.zeros((batch, 1, 4), jnp.int32)}
  pixels = jnp.zeros((batch, 1, side, side, 3), jnp.float32)
  return tokens, pixels
