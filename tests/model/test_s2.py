"""The s2 variant against a PyTorch oracle of the S2-Wrapper procedure (float32, 1e-5).

The oracle below is written from the S2 paper (Shi et al. 2024, arXiv 2403.13043) and the
S2-Wrapper's documented `multiscale_forward(model, x, img_sizes=[336, 672, 1008],
max_split_size=336)` as LLaVA's S2 tower calls it, not from infllava_jax: each scale is a
bicubic `F.interpolate` of the input, split into max_split_size squares stacked on the batch
dimension, run through the tower, the squares' maps concatenated back into one map, that map
area-interpolated to the first scale's feature size, and the scales concatenated on channels.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import flax.linen as nn
from flax import traverse_util

from infllava_jax.config import load_config
from infllava_jax.convert import mapping
from infllava_jax.convert.clip_table import clip_table, clip_unused
from infllava_jax.convert.sources import PROJECTOR_TABLE
from infllava_jax.errors import ConfigError
from infllava_jax.model import infllava, s2
from infllava_jax.training import flops

TOL = 1e-5


def oracle_multiscale(tower, images, img_sizes, split):
  """S2-Wrapper in PyTorch: [B, C, H, W] -> [B, (h w), len(img_sizes) * C'] (the 'bnc' output)."""
  b = images.shape[0]
  maps = []
  for size in sorted(img_sizes):
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    n = math.ceil(size / split)
    # split_chessboard: square (i, j) of every image, squares concatenated on the batch axis.
    squares = torch.cat([x[:, :, i * split:(i + 1) * split, j * split:(j + 1) * split]
                         for i in range(n) for j in range(n)], dim=0)
    out = tower(squares)  # [n*n*B, h*w, C']
    side = int(out.shape[1] ** 0.5)
    out = out.transpose(1, 2).reshape(out.shape[0], -1, side, side)
    # merge_chessboard: the inverse, rows of squares concatenated on width then height.
    merged = torch.cat([torch.cat([out[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)],
                                  dim=-1) for i in range(n)], dim=-2)
    maps.append(merged)
  size = maps[0].shape[-2:]
  out = torch.cat([F.interpolate(m, size=size, mode="area") for m in maps], dim=1)
  return out.flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def cfg():
  return load_config("configs/tiny.py:s2").model


@pytest.fixture(scope="module")
def torch_parts(cfg):
  v = cfg.vision
  torch.manual_seed(0)
  clip_model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
      num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
      hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps)).eval()
  with torch.no_grad():  # non-trivial norms and class token (see tests/model/test_clip.py)
    for name, tensor in clip_model.named_parameters():
      if "norm" in name or "class_embedding" in name:
        tensor.add_(0.5 * torch.randn_like(tensor))
  projector = torch.nn.Sequential(torch.nn.Linear(len(cfg.s2.scales) * v.width, cfg.llm.width),
                                  torch.nn.GELU(), torch.nn.Linear(cfg.llm.width, cfg.llm.width))
  return clip_model, projector


def tower_fn(clip_model, feature_layer):
  """LLaVA's CLIP feature: hidden_states[feature_layer] without the CLS token."""
  return lambda x: clip_model(pixel_values=x, output_hidden_states=True).hidden_states[
      feature_layer][:, 1:]


@pytest.fixture(scope="module")
def params(cfg, torch_parts):
  """The tiny s2 model's params with CLIP and the projector converted from the torch ones."""
  clip_model, projector = torch_parts
  model = infllava.build_model(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), *infllava.dummy_inputs(cfg))["params"])
  vision = mapping.torch_to_params(
      [(f"vision_model.{k}", t.numpy()) for k, t in clip_model.state_dict().items()],
      clip_table(cfg.vision), params["vision"], ignore=clip_unused(cfg.vision),
      source="tiny CLIP")
  proj = mapping.torch_to_params(
      [(k, t.detach().numpy()) for k, t in projector.state_dict().items()], PROJECTOR_TABLE,
      params["projector"], source="tiny projector")
  return {**params, "vision": vision, "projector": proj}


def test_encode_images_equals_the_s2_wrapper_oracle(cfg, torch_parts, params):
  clip_model, projector = torch_parts
  side = infllava.input_size(cfg)
  assert side == 252  # the processor gives the largest scale, as LLaVA's S2 tower
  images = np.random.default_rng(0).standard_normal((2, side, side, 3)).astype(np.float32)
  with torch.no_grad():
    features = oracle_multiscale(tower_fn(clip_model, cfg.vision.feature_layer),
                                 torch.from_numpy(images).permute(0, 3, 1, 2),
                                 list(cfg.s2.scales), cfg.vision.image_size)
    expected = projector(features).numpy()
  assert features.shape == (2, 36, 3 * cfg.vision.width)
  model = infllava.build_model(cfg)
  got = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                         method=infllava.InfLlava.encode_images))(
                                             params, jnp.asarray(images))
  assert got.shape == (2, infllava.num_image_tokens(cfg), cfg.llm.width)
  np.testing.assert_allclose(np.asarray(got), expected, atol=TOL, rtol=TOL)


def test_merge_puts_every_tile_back_and_pools_by_area(cfg):
  # Features that encode (scale, tile, row, column): each pooled token must be the mean of the
  # n x n block of the merged map it covers.
  g, width = 6, 2
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((1, s2.num_views(cfg), g * g, width)).astype(np.float32)
  out = np.asarray(s2.merge(jnp.asarray(feats), cfg)).reshape(g, g, 3, width)
  start = 0
  for k, n in enumerate((1, 2, 3)):
    tiles = feats[0, start:start + n * n].reshape(n, n, g, g, width)
    start += n * n
    big = tiles.transpose(0, 2, 1, 3, 4).reshape(n * g, n * g, width)
    pooled = big.reshape(g, n, g, n, width).mean(axis=(1, 3))
    np.testing.assert_allclose(out[:, :, k], pooled, atol=1e-6)


def test_counts_of_the_default_and_the_tiny_scales(cfg):
  big = load_config("configs/s2_8b.py").model
  assert s2.scales(big) == (336, 672, 1008)
  assert (infllava.num_views(big), infllava.num_image_tokens(big), infllava.feature_width(big),
          infllava.input_size(big)) == (14, 576, 3072, 1008)
  assert (infllava.num_views(cfg), infllava.num_image_tokens(cfg),
          infllava.input_size(cfg)) == (14, 36, 252)
  # CLIP runs on 14 tiles per image; the projector reads 3 x 1024 channels.
  baseline = load_config("infllava_8b:llava").model
  assert flops.vit_forward_flops(big)[0] == 14 * flops.vit_forward_flops(baseline)[0]
  assert (flops.projector_forward_flops(big, 576) - flops.projector_forward_flops(baseline, 576)
          == 2 * 576 * 2048 * 4096)
  stage2 = load_config("infllava_8b_stage2:s2")  # the same recipe, nothing of a DEM
  assert stage2.model.variant == "s2" and stage2.model.vision.param_dtype == "bfloat16"
  assert stage2.train.trainable == (r"^projector/", r"^llm/")
  assert stage2.train.init_include == (r"^projector/",)


@pytest.mark.parametrize("overrides, message", [
    (dict(scales=(84, 126)), "multiples of model.vision.image_size=84"),
    (dict(scales=(168, 252)), "the smallest equal to it"),
    (dict(feature_select="cls_patch"), "needs 'patch'"),
])
def test_config_errors_name_the_field(cfg, overrides, message):
  bad = cfg.copy_and_resolve_references()
  if "scales" in overrides:
    bad.s2.scales = overrides["scales"]
  else:
    bad.vision.feature_select = overrides["feature_select"]
  with pytest.raises(ConfigError, match=message):
    infllava.input_size(bad)


def test_processor_size_is_refused(cfg):
  bad = cfg.copy_and_resolve_references()
  bad.dcm.processor_size = 84
  with pytest.raises(ValueError, match="reads images at its largest scale 252"):
    infllava.input_size(bad)
