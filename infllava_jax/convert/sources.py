"""The checkpoints `infllava convert from-pytorch` reads, each as a `Source` ready to plan.

Three sources, one path. Each source names its tensors in the INF-LLaVA release spelling
(docs/architecture.md#release-layout) or its own, picks the table that maps those names to our param paths,
and derives `config.model` from its config.json and its tensors' shapes:

  release_source(DIR)           INF-LLaVA release: config.json (model_type llava_llama),
                                *.safetensors shards + model.safetensors.index.json
  separate_source(LLAMA, CLIP,  Hugging Face LLaMA-3 and CLIP folders, plus optionally a
                  PROJECTOR)    stage-1 mm_projector.bin; what is absent is initialised (docs/fidelity.md#module-init)
  llava_hf_source(DIR)          llava-hf LlavaForConditionalGeneration -> the LLaVA-1.5
                                baseline variant; LlavaNextForConditionalGeneration ->
                                the llava_next (AnyRes) variant

`plan.plan(source, reader)` then checks every name and shape against the model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterable, Mapping

from ml_collections import ConfigDict

from infllava_jax.config import load_config
from infllava_jax.convert.clip_table import clip_table, clip_unused
from infllava_jax.convert.dem_table import DEM_TABLE
from infllava_jax.convert.llama_table import EMBED, LM_HEAD, llama_config_from_hf, llama_table
from infllava_jax.convert.mapping import LINEAR, ConversionError, Rule, Table, prefixed
from infllava_jax.convert.readers import TensorRef, file_refs, folder_refs, read_json

# ---------------------------------------------------------------------------- names

RELEASE_MODEL_TYPE = "llava_llama"
LLAVA_HF_MODEL_TYPE = "llava"
LLAVA_NEXT_HF_MODEL_TYPE = "llava_next"
# llava-hf model_type -> our model.variant.
LLAVA_HF_VARIANTS = {LLAVA_HF_MODEL_TYPE: "llava", LLAVA_NEXT_HF_MODEL_TYPE: "llava_next"}
RELEASE_CLIP = "model.vision_tower.vision_tower."
RELEASE_DEM = "model.spatial_embed."
RELEASE_PROJECTOR = "model.mm_projector."
LLAVA_HF_CLIP = "model.vision_tower."
LLAVA_HF_LLM = "model.language_model."

# mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): indices 0 and 2 (docs/fidelity.md#projector).
PROJECTOR_TABLE: Table = (
    Rule("0.weight", "fc1/kernel", LINEAR), Rule("0.bias", "fc1/bias"),
    Rule("2.weight", "fc2/kernel", LINEAR), Rule("2.bias", "fc2/bias"),
)
LLAVA_HF_PROJECTOR_TABLE: Table = (
    Rule("linear_1.weight", "fc1/kernel", LINEAR), Rule("linear_1.bias", "fc1/bias"),
    Rule("linear_2.weight", "fc2/kernel", LINEAR), Rule("linear_2.bias", "fc2/bias"),
)
# llava-hf checkpoints spell names as transformers' module tree did when they were saved
# (<4.52 and 5.x save_pretrained: `language_model.model.`, `vision_tower.`; hub files also
# `vision_tower.vision_model.`). First matching prefix wins; the result is the 5.x module tree.
LLAVA_HF_RENAMES = (
    ("language_model.model.", LLAVA_HF_LLM),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", LLAVA_HF_CLIP),
    ("vision_tower.vision_model.", LLAVA_HF_CLIP),
    ("vision_tower.", LLAVA_HF_CLIP),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)
LLAVA_HF_NEWLINE = "model.image_newline"
# A CLIP folder (CLIPModel or CLIPVisionModel, any transformers version) -> `vision_model.*`.
CLIP_RENAMES = tuple((p, "vision_model." + p) for p in
                     ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))
# CLIPModel's text half and heads: never part of our model.
CLIP_TEXT = [r"text_model\.", r"visual_projection\.", r"text_projection\.", r"logit_scale\Z"]


def release_table(model_cfg: ConfigDict) -> Table:
  """Release name -> param path: LLM + CLIP copy + DEM (INF-LLaVA only) + projector."""
  table = (*prefixed(llama_table(model_cfg.llm), "", "llm"),
           *prefixed(clip_table(model_cfg.vision), RELEASE_CLIP, "vision"),
           *prefixed(PROJECTOR_TABLE, RELEASE_PROJECTOR, "projector"))
  if model_cfg.variant == "infllava":
    table += prefixed(DEM_TABLE, RELEASE_DEM, "dem")
  return table


def release_ignore(model_cfg: ConfigDict) -> list[str]:
  """Release tensors known and not loaded: CLIP past the feature layer, post_layernorm."""
  return clip_unused(model_cfg.vision, RELEASE_CLIP)


def llava_hf_table(model_cfg: ConfigDict) -> Table:
  """llava-hf (5.x module-tree names, after LLAVA_HF_RENAMES) -> param path."""
  llm = tuple(Rule(r.torch.replace("model.", LLAVA_HF_LLM, 1) if r.torch.startswith("model.")
                   else r.torch, "llm/" + r.path, r.transform)
              for r in llama_table(model_cfg.llm))
  vision = tuple(Rule(LLAVA_HF_CLIP + r.torch.removeprefix("vision_model."), "vision/" + r.path,
                      r.transform) for r in clip_table(model_cfg.vision))
  newline = ((Rule(LLAVA_HF_NEWLINE, "image_newline"),) if model_cfg.variant == "llava_next"
             else ())
  return (*llm, *vision,
          *prefixed(LLAVA_HF_PROJECTOR_TABLE, "model.multi_modal_projector.", "projector"),
          *newline)


def llava_hf_ignore(model_cfg: ConfigDict) -> list[str]:
  return [p.replace(re.escape("vision_model."), "", 1)
          for p in clip_unused(model_cfg.vision, LLAVA_HF_CLIP)]


def renamed(name: str, renames: Iterable[tuple[str, str]]) -> str:
  for old, new in renames:
    if name.startswith(old):
      return new + name[len(old):]
  return name


# ---------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
  """A checkpoint, ready to plan: tensors under the table's names, and the model config.

  `init`: top-level modules or params (e.g. 'dem', 'projector', 'image_newline') the
  checkpoint lacks, initialised as the model's init (PyTorch's defaults:
  docs/fidelity.md#module-init). `pad_row`: the model's vocabulary is the
  checkpoint's + 1, the <pad> row (docs/fidelity.md#pad-row), added as the mean row to the
  embedding and the head.
  """
  label: str
  tensors: dict[str, TensorRef]
  table: Table
  ignore: list[str]
  model_cfg: ConfigDict
  init: tuple[str, ...] = ()
  pad_row: bool = False


def base_config(config: ConfigDict | None, variant: str = "infllava") -> ConfigDict:
  """`config.model` to start from: what a checkpoint cannot say (DCM, DEM, heads, ...)."""
  if config is None:
    config = load_config(f"infllava_8b:{variant}").model
  return config.copy_and_resolve_references()


def _vision_from_shapes(tensors: Mapping[str, TensorRef], prefix: str, base: ConfigDict,
                        hf_vision: Mapping | None, source: str) -> ConfigDict:
  """`config.model.vision` from the CLIP tensors' shapes (width, depth, patch, positions).

  `hf_vision` (a CLIPVisionConfig dict, where the checkpoint has one) must agree with the
  shapes. Heads are not visible in shapes: from `hf_vision`, else from `base`.
  """
  def shape(name):
    if prefix + name not in tensors:
      raise ConversionError(f"{source}: missing tensor {prefix + name!r}; cannot infer the "
                            "CLIP vision config")
    return tensors[prefix + name].shape
  width = shape("embeddings.class_embedding")[0]
  patch = shape("embeddings.patch_embedding.weight")[-1]
  positions = shape("embeddings.position_embedding.weight")[0]
  side = math.isqrt(positions - 1)
  if side * side != positions - 1:
    raise ConversionError(f"{source}: {prefix}embeddings.position_embedding.weight has "
                          f"{positions} rows; expected 1 + a square number of patches")
  layer_re = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  found = {int(m.group(1)) for m in map(layer_re.match, tensors) if m}
  mlp_dim = shape("encoder.layers.0.mlp.fc1.weight")[0] if found else base.mlp_dim
  vision = base.copy_and_resolve_references()
  vision.update(dict(width=width, patch_size=patch, image_size=side * patch,
                     depth=max(found) + 1 if found else 0, mlp_dim=mlp_dim))
  if width != base.width:
    vision.heads = max(width // 64, 1)  # CLIP's head size is 64
  if hf_vision:
    declared = dict(width=hf_vision.get("hidden_size"), patch_size=hf_vision.get("patch_size"),
                    image_size=hf_vision.get("image_size"),
                    mlp_dim=hf_vision.get("intermediate_size"))
    wrong = [f"{k}: config says {v}, tensors say {vision[k]}" for k, v in declared.items()
             if v is not None and v != vision[k]]
    depth = hf_vision.get("num_hidden_layers", vision.depth)
    if depth < vision.depth:
      wrong.append(f"depth: config says {depth}, tensors hold layer {vision.depth - 1}")
    if hf_vision.get("hidden_act", "quick_gelu") != "quick_gelu":
      wrong.append(f"hidden_act {hf_vision['hidden_act']!r}: only 'quick_gelu' is supported")
    if wrong:
      raise ConversionError(f"{source}: the CLIP vision config disagrees with the tensors:\n  "
                            + "\n  ".join(wrong))
    vision.depth = depth
    vision.heads = hf_vision.get("num_attention_heads", vision.heads)
    vision.layer_norm_eps = hf_vision.get("layer_norm_eps", vision.layer_norm_eps)
  if width % vision.heads:
    raise ConversionError(f"{source}: CLIP width {width} is not a multiple of heads="
                          f"{vision.heads} (set model.vision.heads in --config)")
  return vision


def _fit_grid(model_cfg: ConfigDict, base: ConfigDict) -> None:
  """Keeps the base config's DCM grid (dcm.image_size / vision.image_size), and S2's scales
  in views, at the new view size."""
  grid = max(base.dcm.image_size // base.vision.image_size, 1)
  model_cfg.dcm.image_size = grid * model_cfg.vision.image_size
  if model_cfg.variant == "s2":
    model_cfg.s2.scales = tuple(s * model_cfg.vision.image_size // base.vision.image_size
                                for s in base.s2.scales)


def _s2_scales(hf: Mapping, config_path: str) -> tuple[int, ...]:
  """LLaVA's `s2_scales` field ("336,672,1008", its tower's default "336,672")."""
  text = hf.get("s2_scales", "336,672")
  try:
    return tuple(sorted(int(s) for s in str(text).split(",")))
  except ValueError:
    raise ConversionError(f"{config_path}: s2_scales={text!r}; expected comma-separated "
                          "pixel sizes such as '336,672,1008'") from None


def _select(feature: str, source: str) -> str:
  choices = {"patch": "patch", "cls_patch": "cls_patch", "default": "patch", "full": "cls_patch"}
  if feature not in choices:
    raise ConversionError(f"{source}: vision feature selection {feature!r}; expected one of "
                          f"{sorted(choices)}")
  return choices[feature]


def _llm_config(hf: Mapping, base: ConfigDict, source: str, allow_tied: bool = False):
  try:
    llm = llama_config_from_hf(hf, source=source, allow_tied=allow_tied)
  except (KeyError, ValueError) as err:
    raise ConversionError(f"{source}: {err}") from err
  llm.param_dtype = base.llm.param_dtype
  return llm


def release_source(model_dir: str, config: ConfigDict | None = None) -> Source:
  """An INF-LLaVA (or original LLaVA-1.5, with a `:llava` config) release folder; a LLaVA-S2
  one (config.json `s2: true`, `s2_scales`) reads as the s2 variant, its projector
  len(scales) x CLIP wide."""
  config_path = os.path.join(model_dir, "config.json")
  hf = read_json(config_path)
  if hf.get("model_type") != RELEASE_MODEL_TYPE:
    hint = (" (a llava-hf checkpoint: use --llava-hf)"
            if hf.get("model_type") == LLAVA_HF_MODEL_TYPE else "")
    raise ConversionError(f"{config_path}: model_type={hf.get('model_type')!r}; expected "
                          f"{RELEASE_MODEL_TYPE!r}{hint}")
  is_s2 = bool(hf.get("s2"))
  base = base_config(config, "s2" if is_s2 else "infllava")
  if is_s2 != (base.variant == "s2"):
    raise ConversionError(f"{config_path}: s2={hf.get('s2', False)} but model.variant="
                          f"{base.variant!r}; an S2 checkpoint needs an ':s2' config "
                          "(e.g. infllava_8b:s2) and an ':s2' config an S2 checkpoint")
  tensors = folder_refs(model_dir)
  model_cfg = base.copy_and_resolve_references()
  model_cfg.llm = _llm_config(hf, base, config_path)
  model_cfg.vision = _vision_from_shapes(tensors, RELEASE_CLIP + "vision_model.", base.vision,
                                         hf.get("vision_config"), model_dir)
  model_cfg.vision.feature_layer = hf.get("mm_vision_select_layer", base.vision.feature_layer)
  model_cfg.vision.feature_select = _select(hf.get("mm_vision_select_feature", "patch"),
                                            config_path)
  model_cfg.projector.kind = hf.get("mm_projector_type", base.projector.kind)
  model_cfg.image_token_id = hf.get("image_token_index", base.image_token_id)
  _fit_grid(model_cfg, base)
  if is_s2:
    model_cfg.s2.scales = _s2_scales(hf, config_path)
  width = (len(model_cfg.s2.scales) if is_s2 else 1) * model_cfg.vision.width
  if hf.get("mm_hidden_size", width) != width:
    raise ConversionError(f"{config_path}: mm_hidden_size={hf['mm_hidden_size']} but the "
                          f"CLIP tensors are {model_cfg.vision.width} wide"
                          + (f" x {len(model_cfg.s2.scales)} scales" if is_s2 else ""))
  return Source(model_dir, tensors, release_table(model_cfg), release_ignore(model_cfg),
                model_cfg)


def separate_source(llama_dir: str, clip_dir: str, projector: str | None = None,
                    config: ConfigDict | None = None, add_pad_row: bool = True) -> Source:
  """HF LLaMA-3 + HF CLIP folders (+ a stage-1 mm_projector.bin): the start of training.

  Tensors are renamed into the release spelling, so the release table serves. With
  `add_pad_row` the model's vocabulary is the LLaMA's + 1, the <pad> row (docs/fidelity.md#pad-row).
  Modules without tensors (the DEM and projector without `projector`) are initialised.
  """
  base = base_config(config)
  llama_config_path = os.path.join(llama_dir, "config.json")
  hf_llama = read_json(llama_config_path)
  tensors = dict(folder_refs(llama_dir))
  if LM_HEAD not in tensors and hf_llama.get("tie_word_embeddings") and EMBED in tensors:
    tensors[LM_HEAD] = tensors[EMBED]  # tied: our untied head starts as a copy
  clip_config = read_json(os.path.join(clip_dir, "config.json"))
  clip_tensors = folder_refs(clip_dir)
  text = [re.compile(p) for p in CLIP_TEXT]
  for name, ref in clip_tensors.items():
    if not any(p.match(name) for p in text):
      tensors[RELEASE_CLIP + renamed(name, CLIP_RENAMES)] = ref
  if projector:
    for name, ref in file_refs(projector).items():
      tensors[name] = ref
  model_cfg = base.copy_and_resolve_references()
  model_cfg.llm = _llm_config(hf_llama, base, llama_config_path, allow_tied=True)
  if EMBED in tensors and tensors[EMBED].shape[0] != model_cfg.llm.vocab_size:
    raise ConversionError(f"{llama_dir}: {EMBED!r} has {tensors[EMBED].shape[0]} rows but "
                          f"config.json says vocab_size={model_cfg.llm.vocab_size}")
  model_cfg.llm.vocab_size += int(add_pad_row)
  model_cfg.vision = _vision_from_shapes(tensors, RELEASE_CLIP + "vision_model.", base.vision,
                                         clip_config.get("vision_config", clip_config),
                                         clip_dir)
  _fit_grid(model_cfg, base)
  present = {top for top, prefix in (("dem", RELEASE_DEM), ("projector", RELEASE_PROJECTOR))
             if any(n.startswith(prefix) for n in tensors)}
  init = tuple(m for m in ("dem", "projector")
               if m not in present and (m != "dem" or model_cfg.variant == "infllava"))
  if model_cfg.variant == "llava_next":  # LLaVA-NeXT's newline starts random (its init)
    init += ("image_newline",)
  table = tuple(r for r in release_table(model_cfg) if r.path.split("/")[0] not in init)
  label = f"{llama_dir} + {clip_dir}" + (f" + {projector}" if projector else "")
  return Source(label, tensors, table, release_ignore(model_cfg), model_cfg, init, add_pad_row)


def llava_text_config(hf: Mapping) -> dict:
  """A llava-hf config.json's `text_config`, completed as transformers' LlavaConfig does:
  the hub's files keep only the fields that differ from LlamaConfig's defaults
  (llava-1.5-7b-hf: 5 of them, no sizes)."""
  import transformers
  text_config = {"model_type": "llama", **(hf.get("text_config") or {})}
  return {**text_config, **transformers.LlamaConfig(**text_config).to_dict()}


def llava_hf_variant(directory: str) -> str:
  """The model.variant of a llava-hf folder: "llava" (LlavaForConditionalGeneration) or
  "llava_next" (LlavaNextForConditionalGeneration), from its config.json's model_type."""
  config_path = os.path.join(directory, "config.json")
  model_type = read_json(config_path).get("model_type")
  if model_type not in LLAVA_HF_VARIANTS:
    hint = " (an INF-LLaVA release: use --model)" if model_type == RELEASE_MODEL_TYPE else ""
    raise ConversionError(f"{config_path}: model_type={model_type!r}; expected one of "
                          f"{sorted(LLAVA_HF_VARIANTS)}{hint}")
  return LLAVA_HF_VARIANTS[model_type]


# LlavaNextConfig's image_grid_pinpoints when config.json has none.
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _anyres_config(hf: Mapping, model_cfg: ConfigDict, config_path: str) -> None:
  """`model.anyres` from a LlavaNextConfig's fields (absent: LlavaNextConfig's defaults)."""
  from infllava_jax.model import anyres
  points = hf.get("image_grid_pinpoints") or DEFAULT_GRID_PINPOINTS
  model_cfg.anyres.grid_pinpoints = tuple(tuple(int(v) for v in p) for p in points)
  try:
    anyres.pinpoints(model_cfg)
  except (TypeError, ValueError) as err:
    raise ConversionError(f"{config_path}: image_grid_pinpoints={points!r}: {err}") from err
  if hf.get("vision_feature_select_strategy", "default") != "default":
    raise ConversionError(f"{config_path}: vision_feature_select_strategy="
                          f"{hf['vision_feature_select_strategy']!r}; AnyRes needs 'default' "
                          "(patch features only, no CLS)")


def llava_hf_source(directory: str, config: ConfigDict | None = None) -> Source:
  """A llava-hf folder: LlavaForConditionalGeneration as the LLaVA-1.5 baseline variant,
  LlavaNextForConditionalGeneration as the llava_next (AnyRes) variant."""
  config_path = os.path.join(directory, "config.json")
  variant = llava_hf_variant(directory)
  hf = read_json(config_path)
  base = base_config(config, variant)
  if base.variant != variant:
    raise ConversionError(f"{directory}: a llava-hf {hf['model_type']} checkpoint is the "
                          f"{variant} variant; use a ':{variant}' config (got "
                          f"model.variant={base.variant!r})")
  tensors = {renamed(n, LLAVA_HF_RENAMES): ref for n, ref in folder_refs(directory).items()}
  text_config = llava_text_config(hf)
  model_cfg = base.copy_and_resolve_references()
  model_cfg.llm = _llm_config(text_config, base, f"{config_path} text_config",
                              allow_tied=True)
  if LM_HEAD not in tensors and text_config.get("tie_word_embeddings"):
    tensors[LM_HEAD] = tensors[LLAVA_HF_LLM + "embed_tokens.weight"]
  model_cfg.vision = _vision_from_shapes(tensors, LLAVA_HF_CLIP, base.vision,
                                         hf.get("vision_config"), directory)
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConversionError(f"{config_path}: vision_feature_layer={layer!r}; only one layer "
                          "is supported")
  model_cfg.vision.feature_layer = layer
  model_cfg.vision.feature_select = _select(hf.get("vision_feature_select_strategy", "default"),
                                            config_path)
  wrong = [f"{k}={hf.get(k)!r} (expected {v!r})"
           for k, v in (("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True))
           if hf.get(k, v) != v]
  if wrong:
    raise ConversionError(f"{config_path}: unsupported projector: {', '.join(wrong)}")
  model_cfg.image_token_id = hf.get("image_token_index", hf.get("image_token_id",
                                                                base.image_token_id))
  if variant == "llava_next":
    _anyres_config(hf, model_cfg, config_path)
  _fit_grid(model_cfg, base)
  return Source(directory, tensors, llava_hf_table(model_cfg), llava_hf_ignore(model_cfg),
                model_cfg)
