"""The PEFT adapter layout the reference saves LoRA runs in and loads with `--model-base`.

A LoRA folder holds:

  adapter_config.json          PEFT's LoraConfig: r, lora_alpha, target_modules, ...
  adapter_model.safetensors    (older PEFT: adapter_model.bin) the factors, named
                               `base_model.model.<module>.lora_A.weight` [rank, in] and
                               `...lora_B.weight` [out, rank], <module> as in the base
                               model's state dict (`model.layers.3.self_attn.q_proj`)
  non_lora_trainables.bin      what trained in full (the DEM and projector), a torch pickle
                               named `base_model.model.model.mm_projector.0.weight`, ...
  config.json                  the model's config (the reference's loader reads it)

This module reads and writes the files and names; which modules map to which params is
the converter's (`convert/adapter.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterable, Mapping

import numpy as np
from safetensors.numpy import save_file

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
PREFIX = "base_model.model."  # PeftModel's prefix on the base model's names
FACTORS = ("lora_A", "lora_B")
# adapter_config.json fields that change what the factors mean, with the only value read.
PLAIN_LORA = dict(use_dora=False, bias="none", lora_bias=False, fan_in_fan_out=False,
                  modules_to_save=None, rank_pattern={}, alpha_pattern={},
                  layers_to_transform=None, trainable_token_indices=None,
                  target_parameters=None)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What adapter_config.json says about the factors."""
  rank: int
  alpha: float
  target_modules: tuple[str, ...] | str  # module names, or PEFT's regex string
  use_rslora: bool = False

  @property
  def scaling(self) -> float:
    """The factor on lora_B(lora_A(x)): alpha / rank (rsLoRA: alpha / sqrt(rank))."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def has_adapter(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def read_config(directory: str, known_modules: Iterable[str]) -> AdapterConfig:
  """adapter_config.json of `directory`, checked: a plain LoRA (no DoRA, biases, patterns
  or saved modules) on modules among `known_modules` (`q_proj`, ...).

  Raises FileNotFoundError when there is no adapter_config.json, ValueError naming the
  file and field of anything else that cannot be read.
  """
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: a LoRA folder holds {CONFIG_FILE} and "
                            f"{' or '.join(WEIGHT_FILES)} (PEFT's save_pretrained)")
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from err
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{path}: peft_type={config['peft_type']!r}; expected 'LORA'")
  rank, alpha = config.get("r"), config.get("lora_alpha")
  if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
    raise ValueError(f"{path}: r={rank!r}, lora_alpha={alpha!r}; expected a positive "
                     "integer and a number")
  for field, plain in PLAIN_LORA.items():
    value = config.get(field, plain)
    if (value != plain) if plain else bool(value):  # an empty list / dict is the default
      raise ValueError(f"{path}: {field}={config[field]!r} is not supported; expected "
                       f"{plain!r} (a plain LoRA)")
  targets = config.get("target_modules")
  if isinstance(targets, list):
    unknown = sorted(set(targets) - set(known_modules))
    if unknown:
      raise ValueError(f"{path}: target_modules {unknown} are not mapped; LoRA is read on "
                       f"{sorted(known_modules)}")
    targets = tuple(targets)
  elif not isinstance(targets, str):
    raise ValueError(f"{path}: target_modules={targets!r}; expected a list of module "
                     "names or a regex")
  return AdapterConfig(rank, float(alpha), targets, bool(config.get("use_rslora", False)))


def weights_file(directory: str) -> str:
  """The factors' file: adapter_model.safetensors, else adapter_model.bin."""
  for name in WEIGHT_FILES:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f"{directory}: neither {' nor '.join(WEIGHT_FILES)} found beside "
                          f"{CONFIG_FILE}")


def factor_name(module: str, factor: str) -> str:
  """The saved name of `module`'s factor ('lora_A' or 'lora_B'): 'model.layers.0.mlp.up_proj'
  -> 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'."""
  return f"{PREFIX}{module}.{factor}.weight"


def base_name(name: str) -> str:
  """A saved name without PeftModel's prefix, as the base model's state dict spells it:
  'base_model.model.model.mm_projector.0.weight' -> 'model.mm_projector.0.weight'. The
  reference's loader also drops a doubled 'model.model.', as here."""
  name = name.removeprefix(PREFIX)
  return name.removeprefix("model.") if name.startswith("model.model.") else name


def config_json(rank: int, alpha: float, target_modules: Iterable[str], base_model: str,
                dropout: float = 0.0) -> dict:
  """adapter_config.json of a plain LoRA, as PEFT writes it for a causal LM."""
  return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
              r=rank, lora_alpha=alpha, lora_dropout=dropout,
              target_modules=sorted(target_modules), inference_mode=True,
              init_lora_weights=True, use_rslora=False, **PLAIN_LORA)


def write(directory: str, config: dict, factors: Mapping[str, np.ndarray],
          non_lora: Mapping[str, np.ndarray]) -> None:
  """Writes adapter_config.json, adapter_model.safetensors (`factors` by saved name) and
  non_lora_trainables.bin (`non_lora` by the base model's name, saved with `PREFIX`, a
  torch pickle as the reference's trainer writes it: it needs torch)."""
  try:
    import torch
  except ImportError as err:
    raise ImportError("writing non_lora_trainables.bin needs torch "
                      "(pip install 'infllava-jax[convert]')") from err
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  save_file({n: np.ascontiguousarray(a) for n, a in factors.items()},
            os.path.join(directory, WEIGHT_FILES[0]), metadata={"format": "pt"})
  torch.save({PREFIX + n: _to_torch(a) for n, a in non_lora.items()},
             os.path.join(directory, NON_LORA_FILE))


def _to_torch(array: np.ndarray):
  """A numpy array as a torch tensor; bfloat16 bit for bit (numpy has no bfloat16)."""
  import torch
  array = np.array(array)  # a writable copy: torch shares its memory
  if array.dtype == np.dtype("bfloat16"):
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)
