"""LoRA folders in the PEFT layout (`lora/peft.py`) in and out of the converter.

In: `from-pytorch --model LORA --model-base BASE` plans BASE as any other source, then
`apply_adapter` replaces the params `non_lora_trainables.bin` holds (the DEM and projector
trained in full) and either merges each LoRA pair into its kernel, W + B @ A * scaling in
float32 as the reference's loader does (PEFT's `merge_and_unload`), one scanned layer at a
time, or keeps the factors as LoRA params (`lora/params.py`'s layout) for `lora.json`.

Out: `to-pytorch` of params with LoRA factors writes merged release weights
(`merged_params`), or with `--lora-adapter` the PEFT layout (`export_adapter`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util
from ml_collections import ConfigDict

from infllava_jax.checkpoints import converted
from infllava_jax.convert import plan, sources
from infllava_jax.convert.llama_table import llama_table
from infllava_jax.convert.mapping import (LINEAR, ConversionError, Rule, Table, flax_shape,
                                          match, params_to_torch, torch_shape)
from infllava_jax.convert.readers import Reader, TensorRef, file_refs
from infllava_jax.errors import ConfigError
from infllava_jax.lora import params as lora_params
from infllava_jax.lora import peft

# Factor names of an adapter made on llava-hf's module tree -> the LLaMA tree's.
LLAVA_HF_FACTOR_RENAMES = (
    (peft.PREFIX + sources.LLAVA_HF_LLM, peft.PREFIX + "model."),
    (peft.PREFIX + "language_model.model.", peft.PREFIX + "model."),
)
# What the reference trains in full beside the LoRA factors: non_lora_trainables.bin.
FULLY_TRAINED = ("dem", "projector")


def lora_table(llm_cfg: ConfigDict | None = None) -> Table:
  """PEFT factor name -> LoRA param path, one pair per linear layer of the LLaMA table:
  'base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight' ->
  'llm/layers/attn/q/kernel_lora_a' (lora_A.weight [rank, in] = a.T). Like `llama_table`,
  it does not depend on sizes."""
  rules = []
  for rule in llama_table(llm_cfg):
    if rule.stacked and rule.transform is LINEAR:
      module, kernel = rule.path.rsplit("/", 1)
      for factor, name in zip(peft.FACTORS, lora_params.names(kernel)):
        rules.append(Rule(peft.factor_name(rule.torch.removesuffix(".weight"), factor),
                          f"llm/{module}/{name}", LINEAR))
  return tuple(rules)


def module_name(rule: Rule) -> str:
  """PEFT's target module name of a `lora_table` rule: 'q_proj', ..., 'down_proj'."""
  return rule.torch.split(".")[-3]


TARGET_MODULES = tuple(dict.fromkeys(module_name(r) for r in lora_table()))


@dataclasses.dataclass
class Adapter:
  """A LoRA folder's contents, from metadata: the factors by (LLaMA-tree) saved name and
  the fully trained tensors by release name."""
  directory: str
  config: peft.AdapterConfig
  factors: dict[str, TensorRef]
  non_lora: dict[str, TensorRef]


def read_adapter(directory: str) -> Adapter:
  """The LoRA folder `directory`, without reading a tensor (non_lora_trainables.bin, a
  torch pickle, is loaded for its names). FileNotFoundError for a missing
  adapter_config.json / adapter_model file, ConversionError for a config we cannot read."""
  try:
    config = peft.read_config(directory, TARGET_MODULES)
  except ValueError as err:
    raise ConversionError(str(err)) from err
  factors = {sources.renamed(name, LLAVA_HF_FACTOR_RENAMES): ref
             for name, ref in file_refs(peft.weights_file(directory)).items()}
  non_lora_path = os.path.join(directory, peft.NON_LORA_FILE)
  non_lora = ({peft.base_name(name): ref for name, ref in file_refs(non_lora_path).items()}
              if os.path.isfile(non_lora_path) else {})
  return Adapter(directory, config, factors, non_lora)


def _grouped(refs: Mapping[str, TensorRef], table: Table, file: str, what: str,
             problems: list[str]) -> dict[str, dict[int | None, TensorRef]]:
  """{param path: {layer: ref}} of `refs` by `table`; unmapped names become problems."""
  by_path: dict[str, dict[int | None, TensorRef]] = {}
  for name in sorted(refs):
    found = match(table, name)
    if found is None:
      problems.append(f"{file}: tensor {name!r} {list(refs[name].shape)}: {what}")
      continue
    rule, layer = found
    by_path.setdefault(rule.path, {})[layer] = refs[name]
  return by_path


def _layers_problems(rule: Rule, refs: Mapping, shape: tuple, file: str) -> list[str]:
  layers = list(range(shape[0])) if rule.stacked else [None]
  return ([f"{file}: missing tensor {rule.torch_name(i)!r}" for i in layers if i not in refs]
          + [f"{file}: tensor {rule.torch_name(i)!r}: the model has {len(layers)} layers"
             for i in refs if i not in layers])


def _streamed(rule: Rule, refs: Mapping, shape: tuple, reader: Reader,
              dtype: str | None) -> converted.StreamedArray:
  leaf_dtype = np.dtype(dtype) if dtype else next(iter(refs.values())).dtype
  return converted.StreamedArray(tuple(shape), leaf_dtype, rule.stacked,
                                 plan.leaf_reader(rule, refs, reader, leaf_dtype, False))


def _on_cpu(function):
  """`function` with jax computing on the host's CPU (conversion uses no accelerator)."""
  def on_cpu(*args):
    with jax.default_device(jax.devices("cpu")[0]):
      return np.asarray(function(*args))
  return on_cpu


def apply_adapter(adapter: Adapter, source: sources.Source, model_cfg: ConfigDict,
                  params: dict, reader: Reader, dtype: str | None = None,
                  keep_lora: bool = False) -> dict:
  """`plan.plan`'s tree of the base `source` with the adapter applied (see the module doc).

  Raises one ConversionError listing every tensor that maps to no param, is missing or has
  the wrong shape, and any module the base lacks that non_lora_trainables.bin does not
  supply; factors of another rank than adapter_config.json's r are one line.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  problems: list[str] = []
  _replace_fully_trained(flat, adapter, source, model_cfg, reader, dtype, problems)
  _apply_factors(flat, adapter, model_cfg, reader, dtype, keep_lora, problems)
  if problems:
    raise ConversionError(f"{adapter.directory} over {source.label}: {len(problems)} "
                          "problem(s):\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat, sep="/")


def _replace_fully_trained(flat: dict, adapter: Adapter, source: sources.Source,
                           model_cfg: ConfigDict, reader: Reader, dtype: str | None,
                           problems: list[str]) -> None:
  """The params non_lora_trainables.bin holds (release names) replace the base's in `flat`."""
  file = os.path.join(adapter.directory, peft.NON_LORA_FILE)
  table = sources.release_table(model_cfg)
  ignore = [re.compile(p) for p in sources.release_ignore(model_cfg)]
  full = _grouped({n: r for n, r in adapter.non_lora.items()
                   if not any(p.match(n) for p in ignore)},
                  table, file, "no param of the model has this name", problems)
  rules = {r.path: r for r in table}
  for path, refs in full.items():
    rule, shape = rules[path], tuple(flat[path].shape)
    want = shape[1:] if rule.stacked else shape
    wrong = _layers_problems(rule, refs, shape, file) + [
        f"{file}: tensor {rule.torch_name(i)!r} is {list(ref.shape)}; the model's is "
        f"{list(torch_shape(rule, want))}"
        for i, ref in refs.items() if flax_shape(rule, ref.shape) != want]
    problems += wrong
    if not wrong:
      flat[path] = _streamed(rule, refs, shape, reader, dtype)
  for module in source.init:  # what the base lacks (a LLaMA + CLIP base: DEM, projector)
    lacking = [p for p in flat if p.split("/")[0] == module and p not in full]
    if lacking:
      problems.append(f"the base {source.label} has no {module} and {file} does not hold "
                      f"it (e.g. {rules[lacking[0]].torch_name(0)!r})")


def _apply_factors(flat: dict, adapter: Adapter, model_cfg: ConfigDict, reader: Reader,
                   dtype: str | None, keep_lora: bool, problems: list[str]) -> None:
  """Each kernel of `flat` with LoRA factors: merged, or (`keep_lora`) beside its factors."""
  weights = peft.weights_file(adapter.directory)
  config = adapter.config
  ranks = sorted({ref.shape[0 if ".lora_A." in name else -1]
                  for name, ref in adapter.factors.items() if len(ref.shape) == 2})
  if ranks and ranks != [config.rank]:  # one line, not one per tensor
    raise ConversionError(f"{weights}: factors of rank {', '.join(map(str, ranks))} but "
                          f"{peft.CONFIG_FILE} says r={config.rank}")
  table = lora_table(model_cfg.llm)
  factors = _grouped(adapter.factors, table, weights,
                     f"not a LoRA factor of the LLM's {', '.join(TARGET_MODULES)}", problems)
  rules = {r.path: r for r in table}
  listed = set(config.target_modules) if isinstance(config.target_modules, tuple) else set()
  problems += [f"{weights}: no factors of {m}, which {peft.CONFIG_FILE} lists in "
               "target_modules"
               for m in sorted(listed - {module_name(rules[p]) for p in factors})]
  for kernel in sorted({p.removesuffix(lora_params.SUFFIX_A).removesuffix(lora_params.SUFFIX_B)
                        for p in factors}):
    depth, fan_in, fan_out = flat[kernel].shape
    shapes = dict(zip(lora_params.names(kernel), ((depth, fan_in, config.rank),
                                                  (depth, config.rank, fan_out))))
    wrong = []
    for path, shape in shapes.items():
      rule, refs = rules[path], factors.get(path, {})
      wrong += _layers_problems(rule, refs, shape, weights) + [
          f"{weights}: tensor {rule.torch_name(i)!r} is {list(ref.shape)}; expected "
          f"{list(torch_shape(rule, shape[1:]))}"
          for i, ref in refs.items() if flax_shape(rule, ref.shape) != shape[1:]]
    problems += wrong
    if wrong:
      continue
    a, b = (_streamed(rules[p], factors[p], s, reader, dtype if keep_lora else None)
            for p, s in shapes.items())
    if keep_lora:
      flat.update(zip(shapes, (a, b)))
    else:
      flat[kernel] = _merged(flat[kernel], a, b, config.scaling)


def _merged(kernel: converted.StreamedArray, a: converted.StreamedArray,
            b: converted.StreamedArray, scaling: float) -> converted.StreamedArray:
  """The streamed kernel with its LoRA pair merged in, layer by layer."""
  merge = _on_cpu(lambda i: lora_params.merge_kernel(kernel.read(i), a.read(i), b.read(i),
                                                     scaling))
  return dataclasses.replace(kernel, read=merge, sources=kernel.sources + 2)


def kept_lora(adapter: Adapter) -> tuple[int, float]:
  """(rank, alpha) for lora.json: alpha / rank is the adapter's scaling (rsLoRA's too)."""
  return adapter.config.rank, adapter.config.scaling * adapter.config.rank


# ----------------------------------------------------------------------------- out


class _MergedParam:
  """A lazily read kernel with its LoRA pair merged in when made an array, one scanned
  layer at a time (the host holds the kernel and one layer in float32)."""

  def __init__(self, kernel, a, b, scaling: float):
    self.kernel, self.a, self.b, self.scaling = kernel, a, b, scaling
    self.shape, self.dtype = tuple(kernel.shape), np.dtype(kernel.dtype)

  def __array__(self, dtype=None, copy=None):
    del copy  # a fresh array every time
    merge = _on_cpu(lora_params.merge_kernel)
    out = np.asarray(self.kernel).copy()
    a, b = np.asarray(self.a), np.asarray(self.b)
    for i in range(out.shape[0]):
      out[i] = merge(out[i], a[i], b[i], self.scaling)
    return out if dtype is None else out.astype(dtype)


def _pairs(flat: Mapping[str, Any], folder) -> dict[str, tuple[str, str]]:
  try:
    return lora_params.pairs(flat)
  except ValueError as err:
    raise ConfigError(f"{folder}: {err}") from err


def merged_params(flat: Mapping[str, Any], folder, rank: int,
                  alpha: float) -> dict[str, Any]:
  """The flat tree of lazily read params of `folder` with every LoRA pair merged into its
  kernel and the factors gone (`lora.params.merge`'s result, computed as each kernel is
  read)."""
  pairs = _pairs(flat, folder)
  for kernel, (a, b) in pairs.items():
    if flat[a].shape[-1] != rank or flat[b].shape[-2] != rank:
      raise ConfigError(f"{folder}: {a} {list(flat[a].shape)} and {b} {list(flat[b].shape)}"
                        f" are not of rank {rank}, which the LoRA settings give")
  out = {p: x for p, x in flat.items() if not lora_params.is_lora(p)}
  for kernel, (a, b) in pairs.items():
    out[kernel] = _MergedParam(flat[kernel], flat[a], flat[b], alpha / rank)
  return out


def export_adapter(flat: Mapping[str, Any], folder, config: ConfigDict, out_dir: str,
                   base_model: str, dtype: str | None = None) -> None:
  """Writes the PEFT layout of the flat param tree (lazily read) of `folder`, whose
  `config` it stores with: adapter_config.json (rank and alpha from `lora.params.settings`,
  dropout from train.lora where a run has it), adapter_model.safetensors (the factors)
  and non_lora_trainables.bin (the DEM and projector, `FULLY_TRAINED`)."""
  model_cfg = config.model
  ltable = tuple(r for r in lora_table(model_cfg.llm) if r.path in flat)
  if not ltable:
    raise ConfigError(f"{folder}: no LoRA factors (params *_lora_a / *_lora_b) to write as "
                      "an adapter; without --lora-adapter it exports as release weights")
  _pairs(flat, folder)  # every factor with its partner and kernel
  rank, alpha = lora_params.settings(folder, config)
  dropout = float(config.get("train", ConfigDict()).get("lora", ConfigDict()).get(
      "dropout", 0.0))
  cast = lambda a: np.asarray(a).astype(dtype) if dtype else np.asarray(a)
  as_tree = lambda paths: traverse_util.unflatten_dict({p: flat[p] for p in paths}, sep="/")
  factors = dict(params_to_torch(as_tree({r.path for r in ltable}), ltable))
  full = tuple(r for r in sources.release_table(model_cfg)
               if r.path.split("/")[0] in FULLY_TRAINED)
  non_lora = dict(params_to_torch(as_tree({r.path for r in full}), full))
  config = peft.config_json(rank, alpha, {module_name(r) for r in ltable}, base_model,
                            dropout)
  peft.write(out_dir, config, {n: cast(a) for n, a in factors.items()},
             {n: cast(a) for n, a in non_lora.items()})
