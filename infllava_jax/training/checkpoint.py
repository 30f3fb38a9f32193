"""Checkpoints with Orbax: periodic async saves, resharding restores, params-only init, preemption.

A run directory holds one folder per saved step, each with up to four items:

  <dir>/<step>/params     the param tree (StandardSave: sharded arrays, any mesh on restore)
  <dir>/<step>/opt_state  the optax state (the step counter lives in its `count` leaves)
  <dir>/<step>/data       the grain iterator's state (grain's own Orbax handler; one JSON
                          file per process)
  <dir>/<step>/config     the run's ConfigDict as JSON, so other commands rebuild the model

Orbax writes each step to a temporary folder and renames it when complete, so a save cut
short (kill -9, preemption) never leaves a step that `latest_step` reports; leftovers are
removed when the next `Checkpointer` opens the directory. Multi-host: every process calls
the same methods at the same steps; Orbax decides who writes what.

The `checkpoint` ConfigDict section (`default_checkpoint_config()`):

  every_steps   save when step % every_steps == 0 (plus `force=True` saves at the end).
  max_to_keep   keep the newest N steps (None: all).
  async_save    write in a background thread; the train step may go on (and donate its
                buffers: by default Orbax copies arrays to host before `save` returns).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict


RUN_CHECKPOINTS = "checkpoints"  # a training run's steps live in WORKDIR/checkpoints


def run_checkpoints(path: str | os.PathLike) -> str:
  """The folder of saved steps for a run's workdir, or `path` itself when it is one already."""
  inner = os.path.join(path, RUN_CHECKPOINTS)
  return inner if os.path.isdir(inner) else os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
  """Orbax writes only to absolute paths: a local relative one is resolved against the
  working directory; a URL (gs://...) stays as it is."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def default_checkpoint_config() -> ConfigDict:
  return ConfigDict(dict(
      every_steps=1000,
      max_to_keep=3,
      async_save=True,
  ))


class Restored(NamedTuple):
  step: int
  params: Any
  opt_state: Any
  data_iterator: Any   # the iterator passed to `restore`, with its state set; or None


class Checkpointer:
  """Saves and restores the steps of one run under `directory`.

  Args:
    directory: the run's checkpoint folder (local path or gs://...); created if missing.
    ckpt_cfg: the `checkpoint` config section.
    config: the run's whole config, stored as JSON beside every step (optional).
  """

  def __init__(self, directory: str | os.PathLike, ckpt_cfg: ConfigDict,
               config: ConfigDict | None = None):
    self.directory = absolute(directory)
    self._config = None if config is None else json.loads(config.to_json())
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy also saves the first step of a run: not wanted for 8B.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(int(ckpt_cfg.every_steps)),
            policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=ckpt_cfg.max_to_keep,
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def should_save(self, step: int) -> bool:
    """True on the periodic save steps (every `every_steps`)."""
    return self._manager.should_save(step)

  def save(self, step: int, params: Any, opt_state: Any, data_iterator: Any = None,
           force: bool = False) -> bool:
    """Saves `step` when it is a periodic save step, or always with `force` (end of run,
    preemption). A step already on disk is not saved again. Returns whether it saved.

    `data_iterator` is a grain `DatasetIterator` or `DataLoaderIterator`; its state is
    read now, synchronously, so it matches the batches consumed up to `step`.
    """
    if step in self._manager.all_steps():
      return False
    items = dict(params=ocp.args.StandardSave(params),
                 opt_state=ocp.args.StandardSave(opt_state))
    if data_iterator is not None:
      items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
    if self._config is not None:
      items["config"] = ocp.args.JsonSave(self._config)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def restore(self, abstract_params: Any, abstract_opt_state: Any,
              data_iterator: Any = None, step: int | None = None) -> Restored:
    """Restores `step` (default: the latest) into the shardings of the abstract trees.

    Args:
      abstract_params, abstract_opt_state: trees of `jax.ShapeDtypeStruct(shape, dtype,
        sharding=NamedSharding(...))` (see `abstract_tree`); the mesh may differ from the
        one that saved, arrays are resharded on read.
      data_iterator: a fresh grain iterator over the same data; its state is set to the
        saved one. None skips the data item.
    """
    step = self._resolve_step(step)
    items = dict(params=ocp.args.StandardRestore(abstract_params),
                 opt_state=ocp.args.StandardRestore(abstract_opt_state))
    if data_iterator is not None:
      items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step, out.params, out.opt_state,
                    out.data if data_iterator is not None else None)

  def _resolve_step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint step in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} not in {self.directory}; "
                              f"steps there: {list(self._manager.all_steps())}")
    return step

  def wait_until_finished(self):
    """Blocks until the async save in flight (if any) is committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc):
    self.close()


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings` (a matching tree,
  or one sharding for every leaf): the restore target."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _step_dir(path: epath.Path, step: int | None, item: str) -> epath.Path:
  """`path` itself when it holds `item`, else a step of the run folder `path`."""
  if (path / item).is_dir():
    if step is not None:
      raise ValueError(f"{path} is a single checkpoint step; step={step} cannot apply")
    return path
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = manager.all_steps()
  if step is None:
    step = manager.latest_step()
  manager.close()
  if step is None or step not in steps:
    wanted = "a complete checkpoint step" if step is None else f"checkpoint step {step}"
    raise FileNotFoundError(f"{path}: no {item!r} item and no {wanted} "
                            f"(steps: {list(steps)})")
  return path / str(step)


def _replicated() -> NamedSharding:
  return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())


def restore_params_only(path: str | os.PathLike, target: Any,
                        include: Sequence[str] | None = None,
                        step: int | None = None) -> Any:
  """Params from a checkpoint for `--init_from`, optionally only a subset.

  Args:
    path: a run folder (its latest step, or `step`), one step folder, or any folder with an
      Orbax param tree in `path/params` (the converted format of `convert/checkpoint_io.py`).
    target: the nested-dict param tree to fill: arrays or `ShapeDtypeStruct`s (with
      shardings; none means replicated). Leaves whose '/'-joined path matches an `include`
      regex (all leaves if None) are read from the checkpoint, cast to the target's dtype,
      in the target's sharding; the others are returned from `target` unchanged (e.g.
      fresh init, or weights converted from Hugging Face).

  Only the selected arrays are read. A selected path missing from the checkpoint, or
  saved with another shape, raises ValueError naming it.
  """
  directory = _step_dir(absolute(path), step, "params") / "params"
  flat = traverse_util.flatten_dict(target, sep="/")
  if include is None:
    selected = list(flat)
  else:
    selected = [k for k in flat if any(re.search(p, k) for p in include)]
    if not selected:
      raise ValueError(f"restore_params_only: include={tuple(include)} matches no param of "
                       "the target")
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = traverse_util.flatten_dict(checkpointer.metadata(directory).item_metadata.tree,
                                         sep="/")
    missing = [k for k in selected if k not in saved]
    if missing:
      raise ValueError(f"{directory}: params {missing[:5]} (of {len(missing)}) missing from "
                       "the checkpoint")
    wrong = [f"{k}: saved {tuple(saved[k].shape)}, target {tuple(flat[k].shape)}"
             for k in selected if tuple(saved[k].shape) != tuple(flat[k].shape)]
    if wrong:
      raise ValueError(f"{directory}: shape mismatch: {wrong[:5]}")

    def abstract(x):
      sharding = getattr(x, "sharding", None) or _replicated()
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    subset = traverse_util.unflatten_dict({k: abstract(flat[k]) for k in selected}, sep="/")
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=subset, restore_args=ocp.checkpoint_utils.construct_restore_args(subset),
        partial_restore=True))
  flat.update(traverse_util.flatten_dict(restored, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def read_config(path: str | os.PathLike, step: int | None = None) -> ConfigDict:
  """The run config saved by `Checkpointer` (run folder or step folder). Converted
  checkpoints keep `model_config.json` instead: `convert.checkpoint_io.read_model_config`."""
  path = absolute(path)
  if (path / "params").is_dir() and not (path / "config").is_dir():
    raise FileNotFoundError(f"{path}: no run config stored with these params (a converted "
                            "checkpoint has model_config.json instead)")
  directory = _step_dir(path, step, "config") / "config"
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no run config stored with this checkpoint")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return ConfigDict(checkpointer.restore(directory, args=ocp.args.JsonRestore()))


class PreemptionFlag:
  """Set by SIGTERM (or `signals`); the train loop polls it, saves and exits cleanly.

  Construct it in the main thread (Python's rule for signal handlers). `restore()` puts
  the previous handlers back.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self.signal: int | None = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    self._event.set()

  def is_set(self) -> bool:
    """Whether this process received the signal."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Whether any process received it: the same answer on every host.

    With several processes this is a collective: call it at the same steps everywhere.
    """
    if jax.process_count() == 1:
      return self.is_set()
    flags = multihost_utils.process_allgather(np.array(self.is_set(), np.int32))
    return bool(np.any(flags))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
