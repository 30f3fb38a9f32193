"""Planning a conversion: a `sources.Source` checked against the model from metadata alone
(no tensor is read), then the param tree it maps to, with `converted.StreamedArray`
leaves that read their PyTorch tensor(s) only when written, one layer at a time.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from ml_collections import ConfigDict

from infllava_jax.checkpoints import converted
from infllava_jax.convert.mapping import ConversionError, Rule, flax_shape, match, torch_shape
from infllava_jax.convert.readers import Reader, TensorRef
from infllava_jax.convert.sources import Source
from infllava_jax.model.infllava import build_model, dummy_inputs

PAD_ROW_PATHS = ("llm/embed/embedding", "llm/lm_head/kernel")


def expected_params(model_cfg: ConfigDict) -> dict:
  """The model's param tree as ShapeDtypeStructs (nothing allocated)."""
  model = build_model(model_cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model_cfg))
  return nn.meta.unbox(abstract["params"])


def init_modules(model_cfg: ConfigDict, modules: Iterable[str], seed: int = 0) -> dict:
  """Fresh params of top-level modules (e.g. 'dem', 'projector'), as the model inits them.

  The model's own init (PyTorch-default Linear init, LayerNorm 1/0: docs/fidelity.md#module-init), jitted with
  only these outputs, so XLA drops the rest of the model and nothing else is allocated.
  """
  modules = tuple(modules)
  if not modules:
    return {}
  model = build_model(model_cfg)
  init = jax.jit(lambda key: {m: model.init(key, *dummy_inputs(model_cfg))["params"][m]
                              for m in modules})
  return jax.tree.map(np.asarray, nn.meta.unbox(init(jax.random.key(seed))))


def _with_pad_row(read: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
  """A [V, D] reader -> [V + 1, D]: the new <pad> row is the mean of the others (docs/fidelity.md#pad-row)."""
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
  want = {p: s for p, s in traverse_util.flatten_dict(expected, sep="/").items()
          if p.split("/")[0] not in source.init}
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
      if flax_shape(rule, refs[i].shape) != slice_shape:
        want_torch = torch_shape(rule, slice_shape)
        pad = (source.pad_row and path in PAD_ROW_PATHS
               and refs[i].shape == (want_torch[0] - 1, *want_torch[1:]))
        if not pad:
          problems.append(_shape_problem(rule, i, path, slice_shape, refs[i], source))
    leaf_dtype = np.dtype(dtype) if dtype else refs[layers[0]].dtype
    leaves[path] = converted.StreamedArray(
        want_shape, leaf_dtype, rule.stacked, leaf_reader(rule, refs, reader, leaf_dtype, pad))
  if problems:
    raise ConversionError(f"{source.label}: {len(problems)} problem(s):\n  "
                          + "\n  ".join(problems))
  params = traverse_util.unflatten_dict(leaves, sep="/")
  fresh = init_modules(model_cfg, source.init, seed)
  if dtype:
    fresh = jax.tree.map(lambda a: a.astype(dtype), fresh)
  params.update(fresh)
  model_cfg.llm.param_dtype = str(leaves["llm/embed/embedding"].dtype)
  model_cfg.vision.param_dtype = str(leaves["vision/class_embed"].dtype)
  return model_cfg, params


def _shape_problem(rule, layer, path, slice_shape, ref, source: Source) -> str:
  expected = torch_shape(rule, slice_shape)
  message = (f"shape mismatch for {rule.torch_name(layer)!r} (param {path}): expected "
             f"{list(expected)}, found {list(ref.shape)} in {os.path.basename(ref.file)}")
  if path in PAD_ROW_PATHS:
    vocab = source.model_cfg.llm.vocab_size
    message += (f"; the model's vocab_size is {vocab}"
                + (f" = the checkpoint's {vocab - 1} + the <pad> row (docs/fidelity.md#pad-row)"
                   if source.pad_row else " (config.json)")
                + f", so {rule.torch_name(layer)!r} needs {vocab} rows")
  return message


def leaf_reader(rule: Rule, refs: Mapping[int | None, TensorRef], reader: Reader,
                 dtype: np.dtype, pad: bool) -> Callable[[int | None], np.ndarray]:
  def read(layer: int | None) -> np.ndarray:
    load = lambda: reader.read(refs[layer])
    array = (_with_pad_row(load) if pad else load)()
    return np.ascontiguousarray(rule.transform.to_flax(array).astype(dtype, copy=False))
  return read


def materialize(params: Mapping, shardings: Any = None) -> dict:
  """A planned tree in memory: each leaf read and, with `shardings` (a matching tree of
  jax Shardings), placed straight into its shards; the host copy is dropped at once."""
  flat_shardings = ({} if shardings is None
                    else traverse_util.flatten_dict(shardings, sep="/"))
  out = {}
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
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
    out[path] = leaf
  return traverse_util.unflatten_dict(out, sep="/")
