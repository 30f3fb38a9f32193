"""PyTorch checkpoint files, read from metadata first and then one tensor at a time.

`folder_refs` / `file_refs` give each tensor's file, name, shape and dtype without reading
it (safetensors headers, sharded folders through their index); a `Reader` reads one
`TensorRef` when asked. Nothing from a checkpoint is executed: safetensors are parsed, .bin
files go through `torch.load(weights_only=True)`, and torch is imported only for .bin files.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Callable, Mapping

# Imported for its side effect too: it registers bfloat16 with numpy, which safetensors'
# numpy reader needs for BF16 tensors.
import ml_dtypes
import numpy as np
from safetensors import safe_open

from infllava_jax.convert.mapping import ConversionError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

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
      array = torch_to_numpy(self._bin_state(ref.file)[ref.stored_name])
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


def torch_to_numpy(tensor) -> np.ndarray:
  """A torch tensor as a numpy array; bfloat16 as ml_dtypes.bfloat16, bit for bit."""
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
    array_dtype = torch_to_numpy(tensor.reshape(-1)[:0]).dtype
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
