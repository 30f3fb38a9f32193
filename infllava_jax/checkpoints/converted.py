"""The converted-checkpoint format: what `infllava convert from-pytorch` writes and every
other command (train `--init_from`, generate, evaluate) loads.

A converted checkpoint is a folder:

  DIR/model_config.json   the `config.model` ConfigDict as JSON (sizes, variant, dtypes)
  DIR/params/             an Orbax PyTree checkpoint of the param tree
                          {'vision', 'dem' (INF-LLaVA only), 'projector', 'llm'}
                          (what `model.apply({'params': params}, ...)` takes)
  DIR/tokenizer/          the source's Hugging Face tokenizer, when it held one (inference
                          reads the prompt and the answer with it)
  DIR/lora.json           only when the params hold LoRA factors (`lora/params.py`):
                          {"rank": r, "alpha": a}, their scaling alpha / rank

    model_cfg, params = load_converted("ckpt/")            # numpy arrays on the host
    model_cfg, params = load_converted("ckpt/", shardings)  # jax.Arrays, each born sharded

Bounded-memory writing: a leaf may be a `StreamedArray`, which names its shape and dtype and
produces its data one slice (one scanned layer) at a time, only when Orbax writes it. A
type handler registered here writes those leaves one after another, each scanned layer
into its own chunk, so the host holds about one tensor at a time instead of the model. The
stored arrays are ordinary Orbax numpy arrays: restoring needs nothing from this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from ml_collections import ConfigDict
from orbax.checkpoint import future, type_handlers

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
LORA_FILE = "lora.json"
# A Hugging Face tokenizer folder holds at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """An array Orbax writes without it ever being whole in host memory.

  `read(i)` gives slice i ([shape[1:]]) when `stacked`, else `read(None)` gives the whole
  array; each result must have exactly that shape and `dtype`. `sources`: how many source
  tensors one `read` reads (progress counts them).
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  stacked: bool
  read: Callable[[int | None], np.ndarray]
  sources: int = 1

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class _StreamedHandler(type_handlers.NumpyHandler):
  """Writes `StreamedArray`s as Orbax numpy arrays, one leaf and one layer at a time.

  The stock handler writes all leaves concurrently from arrays already in memory. Here each
  stacked leaf is chunked by layer (write shape [1, ...]), so a slice is encoded and
  flushed on its own. The typestr stays 'np.ndarray', so any Orbax restore reads them.
  """

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    return [future.CommitFutureAwaitingContractedSignals(
        self._write_sequentially(values, infos, args), name="streamed_array")]

  async def _write_sequentially(self, values, infos, args):
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      write_shape = (1, *value.shape[1:]) if value.stacked else value.shape
      spec = type_handlers.get_json_tspec_write(
          info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape,
          local_shape=write_shape, dtype=np.dtype(value.dtype),
          process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
      for index in (range(value.shape[0]) if value.stacked else [None]):
        data = _checked(value, index, info.name)
        target = store if index is None else store[index]
        await target.write(data)
        del data


def _checked(value: StreamedArray, index: int | None, name: str) -> np.ndarray:
  data = np.asarray(value.read(index))
  want = value.shape[1:] if index is not None else value.shape
  if data.shape != tuple(want) or data.dtype != np.dtype(value.dtype):
    raise ValueError(f"param {name}{'' if index is None else f' layer {index}'}: produced "
                     f"{data.dtype}{list(data.shape)}, expected "
                     f"{np.dtype(value.dtype)}{list(want)}")
  return data


@functools.cache
def _register_streamed_handler() -> None:
  """Registers the `StreamedArray` handler once, when the first converted checkpoint is
  written: only writing needs it, and registering logs an Orbax warning (its typestr is
  'np.ndarray', shared with the stock handler it extends), which readers need not see."""
  type_handlers.register_type_handler(StreamedArray, _StreamedHandler(), override=True)


def save_converted(directory: str, model_cfg: ConfigDict, params: dict) -> None:
  """Writes `DIR/params` (Orbax) and `DIR/model_config.json`.

  `params` leaves are numpy arrays, jax.Arrays or `StreamedArray`s. DIR must not hold
  a checkpoint already (Orbax refuses to overwrite).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, PARAMS_DIR)):
    raise FileExistsError(f"{os.path.join(directory, PARAMS_DIR)} exists: choose a new --out "
                          "folder (a checkpoint is never overwritten)")
  os.makedirs(directory, exist_ok=True)
  _register_streamed_handler()
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(model_cfg.to_json(indent=2, sort_keys=True))


def save_tokenizer(directory: str, source: str) -> str | None:
  """Copies the Hugging Face tokenizer of folder `source` to DIR/tokenizer, where inference
  finds it (`tokenizer_dir`). Returns that folder, or None when `source` holds no tokenizer
  (none of `TOKENIZER_FILES`)."""
  if not any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
    return None
  from transformers import AutoTokenizer
  target = os.path.join(os.path.abspath(directory), TOKENIZER_DIR)
  AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(target)
  return target


def tokenizer_dir(directory: str) -> str | None:
  """DIR/tokenizer of a converted checkpoint, if the conversion found one to copy."""
  path = os.path.join(os.path.abspath(directory), TOKENIZER_DIR)
  return path if os.path.isdir(path) else None


def save_lora(directory: str, rank: int, alpha: float) -> None:
  """Writes DIR/lora.json: the settings of the LoRA factors DIR/params holds."""
  with open(os.path.join(os.path.abspath(directory), LORA_FILE), "w") as f:
    json.dump({"rank": rank, "alpha": alpha}, f, indent=2)


def read_lora(directory: str) -> dict | None:
  """{"rank", "alpha"} of DIR/lora.json, or None when DIR has none."""
  path = os.path.join(os.fspath(directory), LORA_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_model_config(directory: str) -> ConfigDict:
  """The `config.model` stored beside the params."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {directory} is not a converted checkpoint "
                            "(run `infllava convert from-pytorch` first)")
  with open(path) as f:
    return ConfigDict(json.load(f))


def is_converted(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, CONFIG_FILE))
          and os.path.isdir(os.path.join(directory, PARAMS_DIR)))


def params_metadata(directory: str) -> dict:
  """The stored param tree with `.shape` / `.dtype` leaves, read without loading any data."""
  metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(os.path.abspath(directory),
                                                            PARAMS_DIR))
  tree = getattr(metadata, "item_metadata", metadata)
  return getattr(tree, "tree", tree)


def load_converted(directory: str, shardings: Any = None) -> tuple[ConfigDict, dict]:
  """(model_cfg, params) of a converted checkpoint.

  shardings: None gives numpy arrays on the host; a tree of `jax.sharding.Sharding`
  matching the params (e.g. from `sharding.param_shardings`, unboxed to the 'params'
  subtree) or one Sharding for all gives jax.Arrays, each read straight into its shards.
  """
  model_cfg = read_model_config(directory)
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  checkpointer = ocp.PyTreeCheckpointer()
  if shardings is None:
    return model_cfg, checkpointer.restore(path)
  metadata = params_metadata(directory)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, metadata)
  restore_args = jax.tree.map(
      lambda meta, sharding: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=meta.shape,
                                                  dtype=meta.dtype),
      metadata, shardings)
  params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return model_cfg, params
