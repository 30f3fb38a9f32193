"""PyTorch checkpoints -> params, streaming: readers, the composed tables, and the plan.

Three sources, one path. Each source names its tensors in the INF-LLaVA release spelling
(spec section 11) or its own, picks the table that maps those names to our param paths,
and derives `config.model` from its config.json and its tensors' shapes:

  release_source(DIR)           INF-LLaVA release: config.json (model_type llava_llama),
                                *.safetensors shards + model.safetensors.index.json
  separate_source(LLAMA, CLIP,  Hugging Face LLaMA-3 and CLIP folders, plus optionally a
                  PROJECTOR)    stage-1 mm_projector.bin; what is absent is initialised (5.7)
  llava_hf_source(DIR)          llava-hf LlavaForConditionalGeneration -> the LLaVA-1.5
                                baseline variant

`plan(source)` checks every name and shape against the model from metadata alone (no tensor
is read) and returns the param tree with `converted.StreamedArray` leaves: a leaf reads
its PyTorch tensor(s) only when it is written, one layer at a time. Nothing from a
checkpoint is executed: safetensors are parsed, .bin files go through
`torch.load(weights_only=True)`, and torch is imported only for .bin files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
# Imported for its side effect too: it registers bfloat16 with numpy, which safetensors'
# numpy reader needs for BF16 tensors.
import ml_dtypes
import numpy as np
import flax.linen as nn
from ml_collections import ConfigDict
from safetensors import safe_open

from infllava_jax.checkpoints import converted
from infllava_jax.config import load_config
from infllava_jax.convert.clip_table import clip_table, clip_unused
from infllava_jax.convert.dem_table import DEM_TABLE
from infllava_jax.convert.llama_table import EMBED, LM_HEAD, llama_config_from_hf, llama_table
from infllava_jax.convert.mapping import (LINEAR, ConversionError, Rule, Table, flatten, match,
                                          prefixed)
from infllava_jax.model.infllava import build_model, dummy_inputs

# ---------------------------------------------------------------------------- names

RELEASE_MODEL_TYPE = "llava_llama"
LLAVA_HF_MODEL_TYPE = "llava"
RELEASE_CLIP = "model.vision_tower.vision_tower."
RELEASE_DEM = "model.spatial_embed."
RELEASE_PROJECTOR = "model.mm_projector."
LLAVA_HF_CLIP = "model.vision_tower."
LLAVA_HF_LLM = "model.language_model."
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PAD_ROW_PATHS = ("llm/embed/embedding", "llm/lm_head/kernel")

# mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): indices 0 and 2 (spec 7).
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
)
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
  return (*llm, *vision,
          *prefixed(LLAVA_HF_PROJECTOR_TABLE, "model.multi_modal_projector.", "projector"))


def llava_hf_ignore(model_cfg: ConfigDict) -> list[str]:
  return [p.replace(re.escape("vision_model."), "", 1)
          for p in clip_unused(model_cfg.vision, LLAVA_HF_CLIP)]


def renamed(name: str, renames: Iterable[tuple[str, str]]) -> str:
  for old, new in renames:
    if name.startswith(old):
      return new + name[len(old):]
  return name


# ---------------------------------------------------------------------------- reading

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """Where one tensor lives and what it is, known from metadata without reading it."""
  file: str
  stored_name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


class Reader:
  """Reads tensors one at a time; counts what it read for progress output.

  safetensors files are opened per read (the memory map is dropped after each tensor, so
  the process never maps the whole checkpoint); a .bin file stays loaded (memory-mapped
  where torch can) until a tensor of another file is read.
  """

  def __init__(self, on_read: Callable[[TensorRef], None] | None = None):
    self.on_read = on_read
    self._bin: tuple[str, dict] | None = None

  def read(self, ref: TensorRef) -> np.ndarray:
    if ref.file.endswith(".safetensors"):
      try:
        with safe_open(ref.file, framework="numpy") as f:
          array = f.get_tensor(ref.stored_name)
      except Exception as err:  # safetensors raises its own error types
        raise ConversionError(f"{ref.file}: cannot read tensor {ref.stored_name!r}: "
                              f"{err}") from err
    else:
      array = _torch_to_numpy(self._bin_state(ref.file)[ref.stored_name])
    if array.shape != ref.shape or array.dtype != ref.dtype:
      raise ConversionError(f"{ref.file}: tensor {ref.stored_name!r} is {array.dtype}"
                            f"{list(array.shape)}; its header said {ref.dtype}{list(ref.shape)}")
    if self.on_read:
      self.on_read(ref)
    return array

  def _bin_state(self, path: str) -> dict:
    if self._bin is None or self._bin[0] != path:
      self._bin = None
      self._bin = (path, load_bin(path))
    return self._bin[1]


def load_bin(path: str) -> dict:
  """A torch pickle's state dict, through `torch.load(weights_only=True)` only.

  weights_only refuses any pickle that would build objects other than tensors and plain
  containers, so nothing in the file can run code.
  """
  try:
    import torch
  except ImportError as err:
    raise ConversionError(f"{path}: reading .bin/.pt files needs torch "
                          "(pip install 'infllava-jax[convert]'); safetensors do not") from err
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:
    raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): "
                          f"{err}") from err
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"],
                                                                          Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
    raise ConversionError(f"{path}: expected a state dict of named tensors, found "
                          f"{type(state).__name__}")
  return dict(state)


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _safetensors_refs(path: str) -> dict[str, TensorRef]:
  try:
    with safe_open(path, framework="numpy") as f:
      refs = {}
      for name in f.keys():
        view = f.get_slice(name)
        dtype = view.get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
          raise ConversionError(f"{path}: tensor {name!r} has dtype {dtype}, which has "
                                "no numpy equivalent")
        refs[name] = TensorRef(path, name, tuple(view.get_shape()),
                               np.dtype(_SAFETENSORS_DTYPES[dtype]))
      return refs
  except ConversionError:
    raise
  except Exception as err:
    raise ConversionError(f"{path}: not a readable safetensors file ({err}); it may be "
                          "truncated or corrupt") from err


def _bin_refs(path: str) -> dict[str, TensorRef]:
  state = load_bin(path)
  refs = {}
  for name, tensor in state.items():
    if not hasattr(tensor, "shape"):
      raise ConversionError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a "
                            "tensor")
    array_dtype = _torch_to_numpy(tensor.reshape(-1)[:0]).dtype
    refs[name] = TensorRef(path, name, tuple(tensor.shape), array_dtype)
  return refs


def file_refs(path: str) -> dict[str, TensorRef]:
  """Name -> TensorRef of one .safetensors, .bin or .pt file, from its metadata."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  return _safetensors_refs(path) if path.endswith(".safetensors") else _bin_refs(path)


def folder_refs(directory: str) -> dict[str, TensorRef]:
  """Name -> TensorRef of a Hugging Face checkpoint folder (sharded with an index, or not)."""
  if os.path.isfile(directory):
    return file_refs(directory)
  if not os.path.isdir(directory):
    raise ConversionError(f"{directory}: no such checkpoint folder")
  for index_name in INDEX_FILES:
    index = os.path.join(directory, index_name)
    if os.path.isfile(index):
      return _indexed_refs(index)
  files = (sorted(glob.glob(os.path.join(directory, "*.safetensors")))
           or sorted(glob.glob(os.path.join(directory, "*.bin"))))
  if not files:
    raise ConversionError(f"{directory}: no *.safetensors or *.bin weights and no "
                          f"{' / '.join(INDEX_FILES)}")
  refs: dict[str, TensorRef] = {}
  for path in files:
    for name, ref in file_refs(path).items():
      if name in refs:
        raise ConversionError(f"tensor {name!r} is in both {refs[name].file} and {path}")
      refs[name] = ref
  return refs


def _indexed_refs(index: str) -> dict[str, TensorRef]:
  """Refs of the shards an index names; every listed tensor must be in its shard."""
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, Mapping):
      raise TypeError(f"weight_map is a {type(weight_map).__name__}")
  except (ValueError, KeyError, TypeError) as err:
    raise ConversionError(f"{index}: bad index ({type(err).__name__}: {err}); expected JSON "
                          "with a 'weight_map' of tensor name -> shard file") from err
  directory = os.path.dirname(index)
  refs: dict[str, TensorRef] = {}
  problems = []
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(directory, shard)
    if not os.path.isfile(path):
      names = sorted(n for n, s in weight_map.items() if s == shard)
      problems.append(f"shard {shard!r} (listed for {len(names)} tensors, e.g. {names[0]!r}) "
                      "does not exist")
      continue
    in_shard = file_refs(path)
    listed = {n for n, s in weight_map.items() if s == shard}
    for name in sorted(listed):
      if name in in_shard:
        refs[name] = in_shard[name]
      else:
        problems.append(f"tensor {name!r} is listed in shard {shard!r} but not in it")
    problems += [f"tensor {name!r} is in shard {shard!r} but the index does not list it"
                 for name in sorted(set(in_shard) - listed)]
  if problems:
    raise ConversionError(f"{index}: bad index, {len(problems)} problem(s):\n  "
                          + "\n  ".join(problems))
  return refs


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: not found")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as err:
    raise ConversionError(f"{path}: not valid JSON ({err})") from err


# ---------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
  """A checkpoint, ready to plan: tensors under the table's names, and the model config.

  `init`: top-level modules (e.g. 'dem', 'projector') the checkpoint lacks, initialised as
  spec 5.7 says. `pad_row`: the model's vocabulary is the checkpoint's + 1, the <pad> row
  (spec 9.2), added as the mean row to the embedding and the head.
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
    config = load_config(f"configs/infllava_8b.py:{variant}").model
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
  """Keeps the base config's DCM grid (dcm.image_size / vision.image_size) at the new view size."""
  grid = max(base.dcm.image_size // base.vision.image_size, 1)
  model_cfg.dcm.image_size = grid * model_cfg.vision.image_size


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
  """An INF-LLaVA (or original LLaVA-1.5, with a `:llava` config) release folder."""
  config_path = os.path.join(model_dir, "config.json")
  hf = read_json(config_path)
  if hf.get("model_type") != RELEASE_MODEL_TYPE:
    hint = (" (a llava-hf checkpoint: use --llava-hf)"
            if hf.get("model_type") == LLAVA_HF_MODEL_TYPE else "")
    raise ConversionError(f"{config_path}: model_type={hf.get('model_type')!r}; expected "
                          f"{RELEASE_MODEL_TYPE!r}{hint}")
  base = base_config(config)
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
  if hf.get("mm_hidden_size", model_cfg.vision.width) != model_cfg.vision.width:
    raise ConversionError(f"{config_path}: mm_hidden_size={hf['mm_hidden_size']} but the "
                          f"CLIP tensors are {model_cfg.vision.width} wide")
  _fit_grid(model_cfg, base)
  return Source(model_dir, tensors, release_table(model_cfg), release_ignore(model_cfg),
                model_cfg)


def separate_source(llama_dir: str, clip_dir: str, projector: str | None = None,
                    config: ConfigDict | None = None, add_pad_row: bool = True) -> Source:
  """HF LLaMA-3 + HF CLIP folders (+ a stage-1 mm_projector.bin): the start of training.

  Tensors are renamed into the release spelling, so the release table serves. With
  `add_pad_row` the model's vocabulary is the LLaMA's + 1, the <pad> row (spec 9.2).
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


def llava_hf_source(directory: str, config: ConfigDict | None = None) -> Source:
  """A llava-hf LlavaForConditionalGeneration folder, as the LLaVA-1.5 baseline variant."""
  config_path = os.path.join(directory, "config.json")
  hf = read_json(config_path)
  if hf.get("model_type") != LLAVA_HF_MODEL_TYPE:
    hint = (" (an INF-LLaVA release: use --model)"
            if hf.get("model_type") == RELEASE_MODEL_TYPE else "")
    raise ConversionError(f"{config_path}: model_type={hf.get('model_type')!r}; expected "
                          f"{LLAVA_HF_MODEL_TYPE!r}{hint}")
  base = base_config(config, "llava")
  if base.variant != "llava":
    raise ConversionError(f"{directory}: a llava-hf checkpoint has no DEM; use a ':llava' "
                          f"config (got model.variant={base.variant!r})")
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
  _fit_grid(model_cfg, base)
  return Source(directory, tensors, llava_hf_table(model_cfg), llava_hf_ignore(model_cfg),
                model_cfg)


# ---------------------------------------------------------------------------- planning


def expected_params(model_cfg: ConfigDict) -> dict:
  """The model's param tree as ShapeDtypeStructs (nothing allocated)."""
  model = build_model(model_cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model_cfg))
  return nn.meta.unbox(abstract["params"])


def init_modules(model_cfg: ConfigDict, modules: Iterable[str], seed: int = 0) -> dict:
  """Fresh params of top-level modules (e.g. 'dem', 'projector'), as the model inits them.

  The model's own init (PyTorch-default Linear init, LayerNorm 1/0: spec 5.7), jitted with
  only these outputs, so XLA drops the rest of the model and nothing else is allocated.
  """
  modules = tuple(modules)
  if not modules:
    return {}
  model = build_model(model_cfg)
  init = jax.jit(lambda key: {m: model.init(key, *dummy_inputs(model_cfg))["params"][m]
                              for m in modules})
  return jax.tree.map(np.asarray, nn.meta.unbox(init(jax.random.key(seed))))


def _flax_shape(rule: Rule, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
  """A PyTorch tensor's shape after the rule's transform (on a zero-byte view, no data)."""
  return tuple(rule.transform.to_flax(np.broadcast_to(np.uint8(0), torch_shape)).shape)


def _torch_shape(rule: Rule, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(rule.transform.to_torch(np.broadcast_to(np.uint8(0), flax_shape)).shape)


def _with_pad_row(read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
  """A [V, D] reader -> [V + 1, D]: the new <pad> row is the mean of the others (spec 9.2)."""
  def padded():
    rows = read()
    mean = rows.astype(np.float32).mean(axis=0, keepdims=True).astype(rows.dtype)
    return np.concatenate([rows, mean])
  return padded


def plan(source: Source, reader: Reader, dtype: str | None = None, seed: int = 0,
         expected: Mapping | None = None) -> tuple[ConfigDict, dict]:
  """(model_cfg, param tree of StreamedArrays / init arrays) for `source`.

  Checks everything from metadata before any tensor is read and raises one
  ConversionError listing every unexpected, missing and mis-shaped tensor by name.
  dtype: None keeps each tensor's stored dtype (bf16 stays bit-exact); a name casts all.
  `model_cfg`'s llm/vision param_dtype record the dtype stored.
  """
  model_cfg = source.model_cfg.copy_and_resolve_references()
  if expected is None:
    expected = expected_params(model_cfg)
  want = {p: s for p, s in flatten(expected).items() if p.split("/")[0] not in source.init}
  by_path: dict[str, dict[int | None, TensorRef]] = {}
  problems = []
  ignore = [re.compile(p) for p in source.ignore]
  for name in sorted(source.tensors):
    if any(p.match(name) for p in ignore):
      continue
    found = match(source.table, name)
    if found is None:
      problems.append(f"unexpected tensor {name!r} {list(source.tensors[name].shape)}: "
                      "no rule maps it")
      continue
    rule, layer = found
    by_path.setdefault(rule.path, {})[layer] = source.tensors[name]
  rules = {r.path: r for r in source.table}
  leaves = {}
  for path, shape_dtype in want.items():
    rule = rules.get(path)
    if rule is None:
      problems.append(f"param {path} has no rule in the {source.label} table")
      continue
    refs = by_path.get(path, {})
    want_shape = tuple(shape_dtype.shape)
    layers = list(range(want_shape[0])) if rule.stacked else [None]
    missing = [rule.torch_name(i) for i in layers if i not in refs]
    extra = [rule.torch_name(i) for i in refs if i not in layers]
    problems += [f"missing tensor {n!r} (param {path})" for n in missing]
    problems += [f"unexpected tensor {n!r}: the model has {len(layers)} layers" for n in extra]
    if missing or extra:
      continue
    slice_shape = want_shape[1:] if rule.stacked else want_shape
    pad = False
    for i in layers:
      if _flax_shape(rule, refs[i].shape) != slice_shape:
        torch_shape = _torch_shape(rule, slice_shape)
        pad = (source.pad_row and path in PAD_ROW_PATHS
               and refs[i].shape == (torch_shape[0] - 1, *torch_shape[1:]))
        if not pad:
          problems.append(_shape_problem(rule, i, path, slice_shape, refs[i], source))
    leaf_dtype = np.dtype(dtype) if dtype else refs[layers[0]].dtype
    leaves[path] = converted.StreamedArray(
        want_shape, leaf_dtype, rule.stacked, _leaf_reader(rule, refs, reader, leaf_dtype, pad))
  if problems:
    raise ConversionError(f"{source.label}: {len(problems)} problem(s):\n  "
                          + "\n  ".join(problems))
  params: dict = {}
  for path, leaf in leaves.items():
    _set(params, path, leaf)
  fresh = init_modules(model_cfg, source.init, seed)
  if dtype:
    fresh = jax.tree.map(lambda a: a.astype(dtype), fresh)
  params.update(fresh)
  model_cfg.llm.param_dtype = str(leaves["llm/embed/embedding"].dtype)
  model_cfg.vision.param_dtype = str(leaves["vision/class_embed"].dtype)
  return model_cfg, params


def _shape_problem(rule, layer, path, flax_shape, ref, source: Source) -> str:
  expected = _torch_shape(rule, flax_shape)
  message = (f"shape mismatch for {rule.torch_name(layer)!r} (param {path}): expected "
             f"{list(expected)}, found {list(ref.shape)} in {os.path.basename(ref.file)}")
  if path in PAD_ROW_PATHS:
    vocab = source.model_cfg.llm.vocab_size
    message += (f"; the model's vocab_size is {vocab}"
                + (f" = the checkpoint's {vocab - 1} + the <pad> row (spec 9.2)"
                   if source.pad_row else " (config.json)")
                + f", so {rule.torch_name(layer)!r} needs {vocab} rows")
  return message


def _leaf_reader(rule: Rule, refs: Mapping[int | None, TensorRef], reader: Reader,
                 dtype: np.dtype, pad: bool) -> Callable[[int | None], np.ndarray]:
  def read(layer: int | None) -> np.ndarray:
    load = lambda: reader.read(refs[layer])
    array = (_with_pad_row(load) if pad else load)()
    return np.ascontiguousarray(rule.transform.to_flax(array).astype(dtype, copy=False))
  return read


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def materialize(params: Mapping, shardings: Any = None) -> dict:
  """A planned tree in memory: each leaf read and, with `shardings` (a matching tree of
  jax Shardings), placed straight into its shards; the host copy is dropped at once."""
  flat_shardings = flatten(shardings) if shardings is not None else {}
  out: dict = {}
  for path, leaf in flatten(params).items():
    if isinstance(leaf, converted.StreamedArray):
      array = np.empty(leaf.shape, leaf.dtype)
      if leaf.stacked:
        for i in range(leaf.shape[0]):
          array[i] = leaf.read(i)
      else:
        array[...] = leaf.read(None)
      leaf = array
    if path in flat_shardings:
      leaf = jax.device_put(leaf, flat_shardings[path])
    _set(out, path, leaf)
  return out
