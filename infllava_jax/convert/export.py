"""Converted checkpoint -> the INF-LLaVA release layout, for PyTorch tools
(docs/architecture.md#release-layout).

Writes `model-0000i-of-0000n.safetensors` shards, `model.safetensors.index.json`, a
`config.json` (model_type llava_llama, the LLaMA fields in the old `rope_theta` /
`rope_scaling` spelling that released checkpoints use, the `mm_*` fields, and the
reference's input settings), for LLaMA-3's vocabulary `generation_config.json` (its stop
ids), and the model's tokenizer where the checkpoint names one (a converted checkpoint's
DIR/tokenizer, a run's data.tokenizer_path). The names come
from the same table `from-pytorch` reads with (`sources.release_table`), so the round trip is
exact. CLIP holds only the layers our tower keeps: the layer past the feature layer and
`post_layernorm` are not written (the reference loader reloads CLIP from its hub copy
anyway); `vision_config` in config.json records the full tower so a re-import knows its depth.

Params with LoRA factors (a LoRA run, or `from-pytorch --keep-lora`) are written merged into
their kernels, or with `lora_adapter` as the PEFT layout the reference loads over its base
(`convert/adapter.py`): adapter files, non_lora_trainables.bin and this config.json.

A llava_next (AnyRes) model is written in llava-hf's LlavaNextForConditionalGeneration
layout instead (`sources.llava_hf_table`, a LlavaNextConfig config.json), which
`transformers` loads and `from-pytorch --llava-hf` reads back.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterator

import numpy as np
from flax import traverse_util
from ml_collections import ConfigDict
from safetensors.numpy import save_file

from infllava_jax.checkpoints import locate, params as checkpoint_params
from infllava_jax.convert import adapter, sources
from infllava_jax.convert.mapping import ConversionError, params_to_torch
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.lora import params as lora_params

INDEX_FILE = "model.safetensors.index.json"
CLIP_NAME = "openai/clip-vit-large-patch14-336"
# LLaMA-3-8B-Instruct's special ids, with the reference's <pad> appended (vocabulary
# 128257): the reference's generation stops on <|end_of_text|> and <|eot_id|>.
LLAMA3_VOCAB_WITH_PAD = 128257
LLAMA3_IDS = dict(bos_token_id=128000, eos_token_id=[128001, 128009])
# adapter_config.json's base_model_name_or_path unless told: the reference's LLM.
BASE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def release_config(model_cfg: ConfigDict, torch_dtype: str) -> dict:
  """config.json of the release layout for `model_cfg` (docs/architecture.md#release-layout)."""
  llm, vision = model_cfg.llm, model_cfg.vision
  config = dict(
      architectures=["LlavaLlamaForCausalLM"], model_type=sources.RELEASE_MODEL_TYPE,
      vocab_size=llm.vocab_size, hidden_size=llm.width, intermediate_size=llm.mlp_dim,
      num_hidden_layers=llm.depth, num_attention_heads=llm.heads,
      num_key_value_heads=llm.kv_heads, head_dim=llm.head_dim, hidden_act="silu",
      rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
      rope_scaling=llm.rope_scaling.to_dict() if llm.rope_scaling else None,
      max_position_embeddings=llm.max_positions, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, torch_dtype=torch_dtype, use_cache=True,
      mm_vision_tower=CLIP_NAME, mm_hidden_size=vision.width,
      mm_projector_type=model_cfg.projector.kind,
      mm_vision_select_layer=vision.feature_layer,
      mm_vision_select_feature=vision.feature_select, mm_patch_merge_type="flat",
      mm_use_im_start_end=False, mm_use_im_patch_token=False,
      vision_config=dict(
          model_type="clip_vision_model", hidden_size=vision.width,
          intermediate_size=vision.mlp_dim, num_hidden_layers=vision.depth,
          num_attention_heads=vision.heads, image_size=vision.image_size,
          patch_size=vision.patch_size, layer_norm_eps=vision.layer_norm_eps,
          hidden_act="quick_gelu"),
  )
  if model_cfg.variant == "s2":  # LLaVA's S2 tower fields; the projector reads all scales
    config.update(mm_hidden_size=len(model_cfg.s2.scales) * vision.width, s2=True,
                  s2_scales=",".join(str(s) for s in model_cfg.s2.scales))
  if model_cfg.image_token_id >= 0:  # a real vocabulary id (llava-hf's <image>)
    config["image_token_index"] = model_cfg.image_token_id
  # How the reference prepares inputs for this checkpoint: images padded to a square with
  # the mean colour (without the field, its process_images centre-crops), prompts at most
  # 2048 tokens, padded on the right.
  config.update(image_aspect_ratio="pad", tokenizer_model_max_length=2048,
                tokenizer_padding_side="right")
  config.update(generation_config(model_cfg) or {})  # the special ids, where known
  return config


def llava_next_config(model_cfg: ConfigDict, torch_dtype: str) -> dict:
  """config.json of llava-hf's LlavaNextForConditionalGeneration for a llava_next model."""
  import transformers
  if model_cfg.image_token_id < 0:
    raise ConversionError(f"model.image_token_id={model_cfg.image_token_id} is not a "
                          "vocabulary id: a llava-hf LLaVA-NeXT checkpoint marks image slots "
                          "with its <image> token, so this model cannot be written as one")
  release = release_config(model_cfg, torch_dtype)
  text = {k: release[k] for k in (
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
      "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
      "attention_bias", "mlp_bias")}
  config = transformers.LlavaNextConfig(
      text_config=transformers.LlamaConfig(**text),
      vision_config=transformers.CLIPVisionConfig(**release["vision_config"]),
      image_token_index=model_cfg.image_token_id,
      image_grid_pinpoints=[list(p) for p in model_cfg.anyres.grid_pinpoints],
      vision_feature_layer=model_cfg.vision.feature_layer,
      vision_feature_select_strategy="default", projector_hidden_act="gelu",
      multimodal_projector_bias=True, tie_word_embeddings=False).to_dict()
  config.update(architectures=["LlavaNextForConditionalGeneration"], dtype=torch_dtype)
  return config


def generation_config(model_cfg: ConfigDict) -> dict | None:
  """generation_config.json for LLaMA-3's vocabulary (its stop ids); None for another one,
  whose special ids the converted checkpoint does not record."""
  if model_cfg.llm.vocab_size != LLAMA3_VOCAB_WITH_PAD:
    return None
  return dict(LLAMA3_IDS, pad_token_id=LLAMA3_VOCAB_WITH_PAD - 1)


def _write_config(out_dir: str, config: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def _shard_plan(params: dict, table, dtype: np.dtype | None, max_bytes: int):
  """[(name, nbytes)] per shard, in table order, each shard at most `max_bytes` (or one tensor)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  shards, current, size = [], [], 0
  for rule in table:
    if rule.path not in flat:
      raise ConversionError(f"param {rule.path} (for {rule.torch_name(0)!r}) is missing")
    value = flat[rule.path]
    item = (np.dtype(dtype) if dtype else np.dtype(value.dtype)).itemsize
    names = ([rule.torch_name(i) for i in range(value.shape[0])] if rule.stacked
             else [rule.torch])
    nbytes = math.prod(value.shape[1:] if rule.stacked else value.shape) * item
    for name in names:
      if current and size + nbytes > max_bytes:
        shards.append(current)
        current, size = [], 0
      current.append((name, nbytes))
      size += nbytes
  if current:
    shards.append(current)
  return shards


def export_release(checkpoint_dir: str, out_dir: str, dtype: str | None = None,
                   max_shard_bytes: int = 5 * 10**9,
                   on_write: Callable[[str, int, int, int], None] | None = None,
                   lora_adapter: bool = False, base_model: str = BASE_MODEL) -> None:
  """Writes the release layout of a converted checkpoint, or of a training run folder's
  newest step that reads (a damaged newer step is reported and skipped), into `out_dir`.

  dtype: None keeps each param's stored dtype; else every tensor is cast.
  on_write(name, nbytes, total_tensors, total_bytes) is called per tensor written.
  LoRA factors are merged into their kernels; with `lora_adapter` they are written as a
  PEFT adapter instead (`base_model`: its base_model_name_or_path) and there must be some.
  """
  locate.read_checkpoint(checkpoint_dir, None, lambda folder: _export_folder(
      folder, out_dir, dtype, max_shard_bytes, on_write, lora_adapter, base_model))


def _export_folder(folder, out_dir: str, dtype: str | None, max_shard_bytes: int,
                   on_write: Callable[[str, int, int, int], None] | None,
                   lora_adapter: bool = False, base_model: str = BASE_MODEL) -> None:
  """`export_release` of one folder holding params/ (a run's step or a converted one)."""
  config = locate.folder_config(folder)
  model_cfg = config.model
  # Each param in its stored dtype, read from disk as its tensors are written: the host
  # holds one param and one shard at a time, not the whole tree.
  params = checkpoint_params.lazy_folder(folder)
  stored = dtype or str(np.dtype(params["llm/embed/embedding"].dtype))
  if lora_adapter:
    adapter.export_adapter(params, folder, config, out_dir, base_model, dtype)
    _write_config(out_dir, release_config(model_cfg, stored))  # the reference's loader reads it
    return
  if any(map(lora_params.is_lora, params)):
    params = adapter.merged_params(params, folder, *lora_params.settings(folder, config))
  if model_cfg.variant == "llava_next":
    table, config_json = sources.llava_hf_table(model_cfg), llava_next_config(model_cfg, stored)
  else:
    table, config_json = sources.release_table(model_cfg), release_config(model_cfg, stored)
  shards = _shard_plan(params, table, dtype, max_shard_bytes)
  total_tensors = sum(len(s) for s in shards)
  total_bytes = sum(n for s in shards for _, n in s)
  os.makedirs(out_dir, exist_ok=True)
  tensors: Iterator[tuple[str, np.ndarray]] = params_to_torch(params, table)
  weight_map = {}
  for number, shard in enumerate(shards, 1):
    file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    arrays = {}
    for want_name, _ in shard:
      name, array = next(tensors)
      assert name == want_name, (name, want_name)  # same table, same order
      arrays[name] = np.ascontiguousarray(array.astype(dtype) if dtype else array)
      weight_map[name] = file
      if on_write:
        on_write(name, arrays[name].nbytes, total_tensors, total_bytes)
    save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
    del arrays
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(dict(metadata=dict(total_size=total_bytes), weight_map=weight_map), f, indent=2)
  _write_config(out_dir, config_json)
  generation = generation_config(model_cfg)
  if generation:
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
  if "data" in config:  # a run's (None: the package's tokenizer) or a copied one
    load_tokenizer(config.data.get("tokenizer_path")).save_pretrained(out_dir)
