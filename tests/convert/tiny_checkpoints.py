"""Random tiny PyTorch checkpoints in the layouts the converter reads (sizes of configs/tiny.py).

  write_release(dir, model_cfg, dtype)  INF-LLaVA release: LlamaForCausalLM + CLIPVisionModel
                                        + DEM + projector tensors, 3 safetensors shards + index
  write_llava_hf(dir, model_cfg)        llava-hf LlavaForConditionalGeneration (save_pretrained)
  write_llava_next_hf(dir, model_cfg)   llava-hf LlavaNextForConditionalGeneration (save_pretrained)
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.torch import save_file

from infllava_jax.convert import mapping, plan, readers, sources


def llama_config(llm_cfg) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.width,
      intermediate_size=llm_cfg.mlp_dim, num_hidden_layers=llm_cfg.depth,
      num_attention_heads=llm_cfg.heads, num_key_value_heads=llm_cfg.kv_heads,
      head_dim=llm_cfg.head_dim, rms_norm_eps=llm_cfg.rms_norm_eps,
      rope_theta=llm_cfg.rope_theta, max_position_embeddings=llm_cfg.max_positions,
      tie_word_embeddings=False)


def clip_config(vision_cfg) -> transformers.CLIPVisionConfig:
  return transformers.CLIPVisionConfig(
      hidden_size=vision_cfg.width, intermediate_size=vision_cfg.mlp_dim,
      num_hidden_layers=vision_cfg.depth, num_attention_heads=vision_cfg.heads,
      image_size=vision_cfg.image_size, patch_size=vision_cfg.patch_size,
      hidden_act="quick_gelu", layer_norm_eps=vision_cfg.layer_norm_eps)


def perturb_norms(model: torch.nn.Module) -> None:
  """Random init leaves norms at (1, 0): perturb them (and CLIP's tiny class token) so a
  swapped scale/bias or a dropped tensor cannot pass a parity test."""
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "norm" in name or "class_embedding" in name:
        tensor.add_(0.5 * torch.randn_like(tensor))


def tiny_models(model_cfg, seed: int = 0):
  torch.manual_seed(seed)
  llama = transformers.LlamaForCausalLM(llama_config(model_cfg.llm)).eval()
  clip = transformers.CLIPVisionModel(clip_config(model_cfg.vision)).eval()
  perturb_norms(llama)
  perturb_norms(clip)
  return llama, clip


def dem_projector_tensors(model_cfg, seed: int = 0) -> dict[str, torch.Tensor]:
  """Random DEM (INF-LLaVA only) and projector tensors under their release names."""
  expected = flatten_dict(plan.expected_params(model_cfg), sep="/")
  gen = torch.Generator().manual_seed(seed)
  rules = [r for r in sources.release_table(model_cfg)
           if r.torch.startswith((sources.RELEASE_DEM, sources.RELEASE_PROJECTOR))]
  return {r.torch: torch.randn(mapping.torch_shape(r, expected[r.path].shape), generator=gen)
          for r in rules}


def release_config_json(model_cfg) -> dict:
  config = llama_config(model_cfg.llm).to_dict()
  config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                mm_vision_tower="openai/clip-vit-large-patch14-336",
                mm_hidden_size=model_cfg.vision.width, mm_projector_type="mlp2x_gelu",
                mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                mm_patch_merge_type="flat", image_aspect_ratio="pad")
  if model_cfg.variant == "s2":  # LLaVA-1.5-S2: the projector reads every scale's channels
    config.update(s2=True, s2_scales=",".join(str(s) for s in model_cfg.s2.scales),
                  mm_hidden_size=len(model_cfg.s2.scales) * model_cfg.vision.width)
  return config


def release_tensors(model_cfg, llama, clip, seed: int = 0) -> dict[str, torch.Tensor]:
  tensors = {name: t.detach().clone() for name, t in llama.state_dict().items()}
  # transformers 5's CLIPVisionModel tree drops `vision_model.`; the release keeps it.
  tensors.update({f"{sources.RELEASE_CLIP}vision_model.{name}": t.detach().clone()
                  for name, t in clip.state_dict().items()})
  tensors.update(dem_projector_tensors(model_cfg, seed))
  return tensors


def write_shards(directory: str, tensors: dict[str, torch.Tensor], num_shards: int = 3) -> None:
  """safetensors shards + model.safetensors.index.json, as save_pretrained lays them out."""
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  weight_map = {}
  for i in range(num_shards):
    file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
    part = {n: tensors[n].contiguous() for n in names[i::num_shards]}
    save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  total = sum(t.numel() * t.element_size() for t in tensors.values())
  with open(os.path.join(directory, readers.INDEX_FILES[0]), "w") as f:
    json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f)


def write_release(directory: str, model_cfg, dtype: torch.dtype = torch.float32, seed: int = 0):
  """A release folder; returns (llama, clip, tensors as written)."""
  llama, clip = tiny_models(model_cfg, seed)
  tensors = {n: t.to(dtype) for n, t in release_tensors(model_cfg, llama, clip, seed).items()}
  write_shards(directory, tensors)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(release_config_json(model_cfg), f)
  return llama, clip, tensors


def llava_hf_model(model_cfg, image_token_index: int, seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.LlavaConfig(
      vision_config=clip_config(model_cfg.vision), text_config=llama_config(model_cfg.llm),
      image_token_index=image_token_index, vision_feature_layer=-2,
      vision_feature_select_strategy="default", projector_hidden_act="gelu")
  model = transformers.LlavaForConditionalGeneration(config).eval()
  perturb_norms(model)
  return model


def write_llava_hf(directory: str, model_cfg, image_token_index: int, seed: int = 0):
  model = llava_hf_model(model_cfg, image_token_index, seed)
  model.save_pretrained(directory)
  return model


def write_llava_next_hf(directory: str, model_cfg, image_token_index: int, seed: int = 0):
  """A random LlavaNextForConditionalGeneration with `model_cfg.anyres`' grid pinpoints."""
  torch.manual_seed(seed)
  config = transformers.LlavaNextConfig(
      vision_config=clip_config(model_cfg.vision), text_config=llama_config(model_cfg.llm),
      image_token_index=image_token_index, vision_feature_layer=-2,
      vision_feature_select_strategy="default", projector_hidden_act="gelu",
      image_grid_pinpoints=[list(p) for p in model_cfg.anyres.grid_pinpoints])
  model = transformers.LlavaNextForConditionalGeneration(config).eval()
  perturb_norms(model)
  model.save_pretrained(directory)
  return model


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
  return readers.torch_to_numpy(tensor)
