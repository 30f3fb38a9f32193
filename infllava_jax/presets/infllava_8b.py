"""The released INF-LLaVA model: CLIP-ViT-L/14-336 seen at 1008 px on a 3x3 grid + LLaMA-3-8B.

Every fixed number of the reference (docs/fidelity.md) lives here, not in code.
`get_config("llava")` gives the LLaVA-1.5 baseline (one 336 view, no DCM/DEM), and
`get_config("s2")` LLaVA-1.5 with S2 (CLIP at 336, 672 and 1008 px, infllava_jax/model/s2.py).
"""

from ml_collections import ConfigDict, config_dict

from infllava_jax.errors import ConfigError


def vision_config() -> ConfigDict:
  """openai/clip-vit-large-patch14-336 (docs/fidelity.md#feature-layer)."""
  return ConfigDict(dict(
      image_size=336,        # side of one sub-image, as CLIP sees it
      patch_size=14,
      width=1024,
      depth=24,
      heads=16,
      mlp_dim=4096,
      layer_norm_eps=1e-5,
      feature_layer=-2,      # index into hidden_states (depth + 1 entries)
      feature_select="patch",  # "patch" drops CLS; "cls_patch" keeps it
      param_dtype="float32",   # frozen tower: "bfloat16" halves its memory
  ))


def llm_config() -> ConfigDict:
  """meta-llama/Meta-Llama-3-8B-Instruct with the added <pad> row (docs/fidelity.md#language-model, #pad-row)."""
  return ConfigDict(dict(
      vocab_size=128257,
      width=4096,
      depth=32,
      heads=32,
      kv_heads=8,
      head_dim=128,
      mlp_dim=14336,
      rms_norm_eps=1e-5,
      rope_theta=500000.0,
      # None, or dict(rope_type="llama3", factor=..., low_freq_factor=...,
      # high_freq_factor=..., original_max_position_embeddings=...).
      rope_scaling=None,
      max_positions=8192,
      param_dtype="float32",
  ))


def dcm_config() -> ConfigDict:
  """Dual-perspective Cropping Module (paper §4.2; docs/fidelity.md#crop-grid)."""
  return ConfigDict(dict(
      # "dual": local + global crops (INF-LLaVA); "local" or "global": one kind only
      # (paper ablation, needs dem.enhance="none"); "none": a single low-res view
      # (LLaVA-1.5 baseline).
      crops="dual",
      image_size=1008,       # model input side; grid = image_size // vision.image_size
      # Side images are preprocessed to (None: image_size). encode_images resizes other
      # sides bicubically to image_size: 336 reproduces the released repository's
      # inference, whose CLIP processor stays at 336 (docs/fidelity.md#inference-resolution; the paper's evaluation
      # resolution is not known). Training used image_size.
      processor_size=config_dict.placeholder(int),
  ))


def dem_config() -> ConfigDict:
  """Dual-perspective Enhancement Module (paper §4.3; docs/fidelity.md#enhancement-windows)."""
  return ConfigDict(dict(
      # "both" (released), "global" or "local" (one enhancement only), or "none"
      # (DCM features fused without cross-attention; paper ablation).
      enhance="both",
      heads=8,
      bottleneck_ratio=16,   # fusion MLP: D -> D // 16 -> D // 2
      fusion="concat",       # "concat" (released: concat + residuals + LN) or "add"
      reduction="bilinear",  # "bilinear" (released; a pick for odd ratios) or "avg"
      merge="mean",          # low-res + DEM: "mean" (released), "add" (paper text) or
                             # "none" (DEM output alone: single-resolution ablation)
      reduced_path=True,     # exact fast path where it applies (docs/fidelity.md#unused-global-crops)
      layer_norm_eps=1e-5,
  ))


def anyres_config() -> ConfigDict:
  """LLaVA-NeXT's AnyRes (infllava_jax/model/anyres.py): llama3-llava-next-8b's grids."""
  return ConfigDict(dict(
      # (height, width) canvases an image may be tiled on, multiples of vision.image_size.
      grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
  ))


def model_config(variant: str = "infllava") -> ConfigDict:
  model = ConfigDict(dict(
      variant=variant,       # "infllava", "llava" (baseline), "llava_next" (AnyRes) or "s2"
      vision=vision_config(),
      llm=llm_config(),
      dcm=dcm_config(),
      dem=dem_config(),
      projector=ConfigDict(dict(kind="mlp2x_gelu")),
      image_token_id=-200,   # reserved id marking image slots in token ids
      dtype="bfloat16",      # compute dtype
      remat_policy="nothing_saveable",  # see infllava_jax.model.layers.REMAT_POLICIES
      # None: jax's own pick on GPU (in jax 0.10 its XLA attention; "cudnn" asks for cuDNN's
      # flash kernel, bf16 compute; docs/performance.md#not-measured); on TPU the LLM's
      # self-attention runs the Pallas splash (flash) kernel when 512 or T (a multiple of
      # 128) divides T; heads-first einsums elsewhere (fastest on CPU); or force "einsum",
      # "xla" or "cudnn".
      attention_impl=None,
      attention_chunk=128,   # causal LLM attention in query blocks of 128 (0: one block)
      # Training only: the LLM's MLP width in this many column sets, one at a time
      # (llama.swiglu): no whole [tokens, 14336] activation, and FSDP gathers one set's
      # weights at a time. Same FLOPs under remat; 1 computes the MLP whole.
      mlp_chunks=1,
  ))
  if variant in ("llava", "llava_next"):
    model.dcm.crops = "none"
    model.dcm.image_size = 336
    model.dem.enhance = "none"
  elif variant == "s2":
    model.dcm.crops = "none"   # no DCM/DEM: S2 cuts its own tiles
    model.dcm.image_size = 336
    model.dem.enhance = "none"
    # LLaVA-1.5-S2's s2_scales "336,672,1008": the first is the tile (CLIP) size and the
    # grid every scale is pooled to; images are preprocessed to the last.
    model.s2 = ConfigDict(dict(scales=(336, 672, 1008)))
  elif variant != "infllava":
    raise ConfigError(f"unknown variant {variant!r}; "
                     "expected 'infllava', 'llava', 'llava_next' or 's2'")
  if variant == "llava_next":
    model.anyres = anyres_config()
  return model


def get_config(arg: str = "infllava") -> ConfigDict:
  config = ConfigDict()
  config.model = model_config(arg or "infllava")
  return config
