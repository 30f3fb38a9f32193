"""CLIP tower parity with Hugging Face `CLIPVisionModel` (float32, 1e-5) and its conversion table."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import flax.linen as nn
from flax import traverse_util

from infllava_jax.convert import mapping
from infllava_jax.convert.clip_table import clip_table, clip_unused
from infllava_jax.model import clip
from infllava_jax.presets import infllava_8b

TOL = 1e-5


def hf_config(vision_cfg):
  return transformers.CLIPVisionConfig(
      hidden_size=vision_cfg.width, intermediate_size=vision_cfg.mlp_dim,
      num_hidden_layers=vision_cfg.depth, num_attention_heads=vision_cfg.heads,
      image_size=vision_cfg.image_size, patch_size=vision_cfg.patch_size,
      hidden_act="quick_gelu", layer_norm_eps=vision_cfg.layer_norm_eps)


@pytest.fixture(scope="module")
def vision_cfg(tiny_config):
  return tiny_config.model.vision.copy_and_resolve_references()


@pytest.fixture(scope="module")
def hf_model(vision_cfg):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(hf_config(vision_cfg)).eval()
  # Random init leaves LayerNorms at (1, 0) and a tiny class token: perturb them so a
  # swapped scale/bias or a dropped class token cannot pass.
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "norm" in name or "class_embedding" in name:
        tensor.add_(0.5 * torch.randn_like(tensor))
  return model


@pytest.fixture(scope="module")
def images(vision_cfg):
  side = vision_cfg.image_size
  return np.random.default_rng(0).standard_normal((5, side, side, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_hidden_states(hf_model, images):
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                   output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def state_dict(model):
  """The tensors under their checkpoint names (`vision_model.*`, as CLIPModel and INF-LLaVA
  store them); transformers 5's CLIPVisionModel module tree drops that prefix."""
  return [(f"vision_model.{name}", t.detach().numpy()) for name, t in model.state_dict().items()]


def convert(vision_cfg, tensors):
  model = clip.VisionTransformer(vision_cfg)
  side = vision_cfg.image_size
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  return mapping.torch_to_params(tensors, clip_table(vision_cfg),
                                 nn.meta.unbox(expected["params"]),
                                 ignore=clip_unused(vision_cfg), source="tiny CLIP")


def run(vision_cfg, params, images):
  model = clip.VisionTransformer(vision_cfg)
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))


@pytest.mark.parametrize("feature_layer", [-2, -1, 0])
def test_matches_hf_hidden_state(vision_cfg, hf_model, images, hf_hidden_states, feature_layer):
  cfg = vision_cfg.copy_and_resolve_references()
  cfg.feature_layer = feature_layer
  params = convert(cfg, state_dict(hf_model))
  ours = run(cfg, params, images)
  want = hf_hidden_states[feature_layer][:, 1:]
  assert ours.shape == want.shape == (5, 36, cfg.width)
  np.testing.assert_allclose(ours, want, rtol=0, atol=TOL)


def test_cls_patch_keeps_class_token(vision_cfg, hf_model, images, hf_hidden_states):
  cfg = vision_cfg.copy_and_resolve_references()
  cfg.feature_select = "cls_patch"
  ours = run(cfg, convert(cfg, state_dict(hf_model)), images)
  np.testing.assert_allclose(ours, hf_hidden_states[-2], rtol=0, atol=TOL)


def test_only_used_layers_are_params(vision_cfg, hf_model):
  params = convert(vision_cfg, state_dict(hf_model))
  assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 64)  # 2 of 3 layers
  assert params["patch_embed"]["kernel"].shape == (14, 14, 3, 64)
  flat = traverse_util.flatten_dict(params, sep="/")
  assert not any("post" in path for path in flat)


def test_unused_regexes_cover_exactly_the_skipped_tensors(vision_cfg, hf_model):
  table = clip_table(vision_cfg)
  patterns = [re.compile(p) for p in clip_unused(vision_cfg)]
  # Older checkpoints (openai's CLIP among them) also store the position_ids buffer.
  names = [name for name, _ in state_dict(hf_model)] + ["vision_model.embeddings.position_ids"]
  ignored = {n for n in names if any(p.match(n) for p in patterns)}
  assert ignored == ({n for n in names if n.startswith("vision_model.encoder.layers.2.")}
                     | {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
                        "vision_model.embeddings.position_ids"})
  # Every other tensor has a rule, and no rule maps an ignored one onto a param.
  assert all(mapping.match(table, n) for n in set(names) - ignored)
  cfg = vision_cfg.copy_and_resolve_references()
  cfg.feature_layer = -1
  assert not any(re.match(p, n) for p in clip_unused(cfg) for n in names
                 if n.startswith("vision_model.encoder"))


def test_round_trip_to_torch(vision_cfg, hf_model):
  cfg = vision_cfg.copy_and_resolve_references()
  cfg.feature_layer = -1
  params = convert(cfg, state_dict(hf_model))
  back = dict(mapping.params_to_torch(params, clip_table(cfg)))
  original = dict(state_dict(hf_model))
  assert set(back) == set(original) - {"vision_model.post_layernorm.weight",
                                       "vision_model.post_layernorm.bias"}
  for name, value in back.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_checkpoint_with_too_few_layers_is_reported(vision_cfg, hf_model):
  cfg = vision_cfg.copy_and_resolve_references()
  cfg.feature_layer = -1  # needs all 3 layers
  tensors = [(n, t) for n, t in state_dict(hf_model)
             if not n.startswith("vision_model.encoder.layers.2.")]
  with pytest.raises(mapping.ConversionError,
                     match=r"missing tensor 'vision_model\.encoder\.layers\.2\.self_attn\.q_proj"):
    convert(cfg, tensors)


def test_feature_layer_out_of_range(vision_cfg):
  cfg = vision_cfg.copy_and_resolve_references()
  cfg.feature_layer = -5
  with pytest.raises(ValueError, match=r"feature_layer=-5 .* 4 hidden states of a 3-layer"):
    clip.num_used_layers(cfg)
  with pytest.raises(ValueError, match="feature_layer=-5"):
    clip_table(cfg)


def test_wrong_image_size_is_named(vision_cfg):
  model = clip.VisionTransformer(vision_cfg)
  with pytest.raises(ValueError, match=r"expected \[N, 84, 84, 3\].*image_size=84.*got \(2, 56, 56, 3\)"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 56, 56, 3)))
  with pytest.raises(ValueError, match=r"got \(2, 3, 84, 84\)"):  # channels-first input
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 3, 84, 84)))


def test_bfloat16_compute_stays_close(vision_cfg, hf_model, images, hf_hidden_states):
  params = convert(vision_cfg, state_dict(hf_model))
  model = clip.VisionTransformer(vision_cfg, dtype="bfloat16", remat_policy="nothing_saveable")
  ours = model.apply({"params": params}, jnp.asarray(images))
  assert ours.dtype == jnp.bfloat16
  want = hf_hidden_states[-2][:, 1:]
  err = np.abs(np.asarray(ours, np.float32) - want).max()
  assert err < 0.1 * np.abs(want).max(), err


def test_released_param_count_matches_hf_minus_unused():
  cfg = infllava_8b.vision_config()
  model = clip.VisionTransformer(cfg)
  side = cfg.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  ours = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  with torch.device("meta"):
    hf = transformers.CLIPVisionModel(hf_config(cfg))
  total = sum(p.numel() for p in hf.parameters())
  unused = (sum(p.numel() for p in hf.encoder.layers[-1].parameters())
            + sum(p.numel() for p in hf.post_layernorm.parameters()))
  assert ours == total - unused


def test_attention_paths_agree_and_bad_name_is_named():
  q, k, v = np.random.default_rng(1).standard_normal((3, 2, 7, 4, 8), np.float32)  # [N, P, H, K]
  attention = jax.jit(clip.attention, static_argnums=3)
  want = attention(q, k, v, "xla")
  for impl in ("einsum", None):
    np.testing.assert_allclose(attention(q, k, v, impl), want, rtol=0, atol=TOL)
  with pytest.raises(ValueError, match=r"attention_impl='flash'"):
    clip.attention(q, k, v, "flash")
