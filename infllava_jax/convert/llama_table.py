"""Hugging Face `LlamaForCausalLM` <-> `model.llama.Llama`: the name table and the config reader.

`llama_config_from_hf` reads a config.json dict in either spelling transformers has used:
old (`rope_theta` + `rope_scaling`, `torch_dtype`; what released LLaMA-3 and INF-LLaVA
checkpoints carry) and new (transformers 5: `rope_parameters` holding `rope_theta`, `dtype`).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from ml_collections import ConfigDict

from infllava_jax.convert.mapping import IDENTITY, LINEAR, Rule, Table

MODEL_TYPES = ("llama", "llava_llama")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def llama_table(llm_cfg: ConfigDict | None = None) -> Table:
  """PyTorch name -> param path of `Llama` (the table does not depend on sizes).

  `llm_cfg` is accepted so every tower's table has the same signature.
  """
  del llm_cfg
  layer = "model.layers.{layer}."
  return (
      Rule(EMBED, "embed/embedding", IDENTITY),
      Rule(layer + "input_layernorm.weight", "layers/attn_norm/scale", IDENTITY),
      Rule(layer + "self_attn.q_proj.weight", "layers/attn/q/kernel", LINEAR),
      Rule(layer + "self_attn.k_proj.weight", "layers/attn/k/kernel", LINEAR),
      Rule(layer + "self_attn.v_proj.weight", "layers/attn/v/kernel", LINEAR),
      Rule(layer + "self_attn.o_proj.weight", "layers/attn/o/kernel", LINEAR),
      Rule(layer + "post_attention_layernorm.weight", "layers/mlp_norm/scale", IDENTITY),
      Rule(layer + "mlp.gate_proj.weight", "layers/mlp/gate/kernel", LINEAR),
      Rule(layer + "mlp.up_proj.weight", "layers/mlp/up/kernel", LINEAR),
      Rule(layer + "mlp.down_proj.weight", "layers/mlp/down/kernel", LINEAR),
      Rule("model.norm.weight", "final_norm/scale", IDENTITY),
      Rule(LM_HEAD, "lm_head/kernel", LINEAR),
  )


def tie_lm_head(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  """Passes (name, array) pairs through and adds `lm_head.weight` = the embedding if absent.

  For checkpoints with `tie_word_embeddings` (saved without `lm_head.weight`): our model
  keeps an untied head, initialised as a copy of the embedding.
  """
  embedding = None
  has_head = False
  for name, array in tensors:
    if name == EMBED:
      embedding = array
    has_head = has_head or name == LM_HEAD
    yield name, array
  if not has_head and embedding is not None:
    yield LM_HEAD, embedding


def _rope_settings(hf: Mapping[str, Any], source: str) -> tuple[float, dict | None]:
  """(rope_theta, our rope_scaling) from either spelling of the RoPE fields."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"{source}: per-layer-type rope_parameters {sorted(params)} are not "
                     "supported; expected one global RoPE")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    scaling = None
  elif rope_type == "llama3":
    missing = [key for key in LLAMA3_KEYS if key not in params]
    if missing:
      raise ValueError(f"{source}: llama3 RoPE scaling lacks {missing}")
    scaling = dict(rope_type="llama3", **{key: float(params[key]) for key in LLAMA3_KEYS})
    # transformers falls back to max_position_embeddings, so do we.
    scaling["original_max_position_embeddings"] = int(params.get(
        "original_max_position_embeddings", hf["max_position_embeddings"]))
  else:
    raise ValueError(f"{source}: rope_type={rope_type!r} is not supported; expected "
                     "'default' or 'llama3'")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor="
                     f"{params['partial_rotary_factor']} is not supported; expected 1.0")
  return float(theta), scaling


def llama_config_from_hf(hf: Mapping[str, Any], *, param_dtype: str | None = None,
                         allow_tied: bool = False, source: str = "config.json") -> ConfigDict:
  """Our `model.llm` config from a HF LLaMA config.json dict (old or new spelling).

  param_dtype: None keeps the checkpoint's `torch_dtype`/`dtype` (float32 when absent).
  allow_tied: accept `tie_word_embeddings` (convert the tensors through `tie_lm_head`; the
  head is then an untied copy). Raises ValueError naming any feature `Llama` lacks.
  """
  model_type = hf.get("model_type", "llama")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type={model_type!r}; expected one of {MODEL_TYPES}")
  unsupported = {
      "attention_bias": (hf.get("attention_bias", False), False),
      "mlp_bias": (hf.get("mlp_bias", False), False),
      "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
      "pretraining_tp": (hf.get("pretraining_tp") or 1, 1),
  }
  if not allow_tied:
    unsupported["tie_word_embeddings"] = (hf.get("tie_word_embeddings", False), False)
  for field, (got, want) in unsupported.items():
    if got != want:
      hint = (" (pass allow_tied=True and convert through tie_lm_head to copy the embedding "
              "into an untied head)" if field == "tie_word_embeddings" else "")
      raise ValueError(f"{source}: {field}={got!r} is not supported; expected {want!r}{hint}")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope_settings(hf, source)
  dtype = param_dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
  return ConfigDict(dict(
      vocab_size=hf["vocab_size"],
      width=hf["hidden_size"],
      depth=hf["num_hidden_layers"],
      heads=heads,
      kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"],
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=theta,
      rope_scaling=scaling,
      max_positions=hf.get("max_position_embeddings", 2048),
      param_dtype=str(dtype),
  ))
