"""Hugging Face `CLIPVisionModel` state-dict names -> `model/clip.py` param paths (docs/architecture.md#release-layout).

Names are those of a stand-alone `CLIPVisionModel` (`vision_model.*`); the copy inside an
INF-LLaVA checkpoint sits under `model.vision_tower.vision_tower.`: use `mapping.prefixed`.
The encoder layers past the feature layer and `post_layernorm` have no params in our tower;
`clip_unused` names them for `torch_to_params(..., ignore=...)`.
"""

from __future__ import annotations

import re

from ml_collections import ConfigDict

from infllava_jax.convert.mapping import CONV, IDENTITY, LINEAR, Rule, Table
from infllava_jax.model.clip import num_used_layers

_LAYER = "vision_model.encoder.layers.{layer}."


def _norm(torch: str, path: str) -> tuple[Rule, Rule]:
  return (Rule(f"{torch}.weight", f"{path}/scale"), Rule(f"{torch}.bias", f"{path}/bias"))


def _dense(torch: str, path: str) -> tuple[Rule, Rule]:
  return (Rule(f"{torch}.weight", f"{path}/kernel", LINEAR), Rule(f"{torch}.bias", f"{path}/bias"))


def clip_table(vision_cfg: ConfigDict) -> Table:
  """The rules for every param of `VisionTransformer(vision_cfg)`.

  Stacked rules cover any layer index; `torch_to_params` with `expected` (the model's
  shapes) reports a layer index past the used depth as unexpected, so pass `clip_unused`
  as `ignore` too.
  """
  num_used_layers(vision_cfg)  # validates feature_layer against depth
  attn = tuple(rule for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                                         ("o", "out_proj"))
               for rule in _dense(f"{_LAYER}self_attn.{theirs}", f"layers/attn/{ours}"))
  return (
      Rule("vision_model.embeddings.class_embedding", "class_embed", IDENTITY),
      Rule("vision_model.embeddings.patch_embedding.weight", "patch_embed/kernel", CONV),
      Rule("vision_model.embeddings.position_embedding.weight", "pos_embed", IDENTITY),
      *_norm("vision_model.pre_layrnorm", "pre_norm"),
      *_norm(f"{_LAYER}layer_norm1", "layers/attn_norm"),
      *attn,
      *_norm(f"{_LAYER}layer_norm2", "layers/mlp_norm"),
      *_dense(f"{_LAYER}mlp.fc1", "layers/mlp/fc1"),
      *_dense(f"{_LAYER}mlp.fc2", "layers/mlp/fc2"),
  )


def clip_unused(vision_cfg: ConfigDict, torch_prefix: str = "") -> list[str]:
  """Regexes of the `CLIPVisionModel` tensors deliberately not loaded.

  Encoder layers with index >= the used depth (layer 23 of the released tower),
  `post_layernorm`, and the `position_ids` buffer older checkpoints carry. Layers below the
  used depth never match, so a missing or extra one is still reported.
  """
  used = num_used_layers(vision_cfg)
  unused_layers = "|".join(str(i) for i in range(used, vision_cfg.depth))
  prefix = re.escape(torch_prefix + "vision_model.")
  patterns = [prefix + r"post_layernorm\.(weight|bias)\Z",
              prefix + r"embeddings\.position_ids\Z"]
  if unused_layers:
    patterns.append(prefix + rf"encoder\.layers\.({unused_layers})\.")
  return patterns
