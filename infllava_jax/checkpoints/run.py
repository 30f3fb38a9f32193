"""A training run's checkpoints with Orbax: periodic async saves, resharding restores.

A run directory holds one folder per saved step, each with up to four items:

  <dir>/<step>/params     the param tree (StandardSave: sharded arrays, any mesh on restore)
  <dir>/<step>/opt_state  the optax state (the step counter lives in its `count` leaves)
  <dir>/<step>/data       the grain iterator's state (grain's own Orbax handler; one JSON
                          file per process)
  <dir>/<step>/config     the run's ConfigDict as JSON, so other commands rebuild the model

Orbax writes each step to a temporary folder and renames it when complete, so a save cut
short (kill -9, preemption) never leaves a step that `latest_step` reports; leftovers are
removed when the next `Checkpointer` opens the directory. A complete step whose files were
damaged later (a truncated shard) fails to restore: `restore_newest` then sets it aside as
`<step>.unreadable-<reason>` and goes on from the step before. Multi-host: every process
calls the same methods at the same steps; Orbax decides who writes what.

The `checkpoint` ConfigDict section (`presets/_sections.checkpoint_config()`):

  every_steps   save when step % every_steps == 0 (plus `force=True` saves at the end).
  max_to_keep   keep the newest N steps (None: all).
  async_save    write in a background thread; the train step may go on (and donate its
                buffers: by default Orbax copies arrays to host before `save` returns).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from infllava_jax.checkpoints import locate, params
from infllava_jax.errors import ConfigError



class Restored(NamedTuple):
  step: int
  params: Any
  opt_state: Any
  data_iterator: Any   # the iterator passed to `restore`, with its state set; or None


def check_config(ckpt_cfg: ConfigDict) -> None:
  """Raises ConfigError for a `checkpoint` section the Checkpointer cannot use."""
  if int(ckpt_cfg.every_steps) < 1:
    raise ConfigError(f"checkpoint.every_steps must be >= 1, got {ckpt_cfg.every_steps} "
                      "(a large value saves only at the end and on preemption)")


class Checkpointer:
  """Saves and restores the steps of one run under `directory`.

  Args:
    directory: the run's checkpoint folder (local path or gs://...); created if missing.
    ckpt_cfg: the `checkpoint` config section.
    config: the run's whole config, stored as JSON beside every step (optional).
  """

  def __init__(self, directory: str | os.PathLike, ckpt_cfg: ConfigDict,
               config: ConfigDict | None = None):
    check_config(ckpt_cfg)
    self.directory = locate.absolute(directory)
    self._config = None if config is None else json.loads(config.to_json())
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy also saves the first step of a run: not wanted for 8B.
        # The preemption policy saves at the step all processes agree on once JAX's
        # preemption service saw a SIGTERM (multi-process runs: `preemption.py`).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(int(ckpt_cfg.every_steps)),
            policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=ckpt_cfg.max_to_keep,
        enable_async_checkpointing=bool(ckpt_cfg.async_save),
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def should_save(self, step: int) -> bool:
    """True on the periodic save steps (every `every_steps`) and at a preemption sync point."""
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
        sharding=NamedSharding(...))` (see `params.abstract_tree`); the mesh may differ
        from the one that saved, arrays are resharded on read.
      data_iterator: a fresh grain iterator over the same data; its state is set to the
        saved one. None skips the data item.

    A param the config's model shapes otherwise than the saved one raises
    ParamMismatchError (a ConfigError) naming it; a step whose files fail to read raises
    UnreadableStepError naming it.
    """
    step = self._resolve_step(step)
    return locate.read_step(self.directory, step,
                            lambda s: self._restore(s, abstract_params, abstract_opt_state,
                                                    data_iterator))

  def restore_newest(self, abstract_params: Any, abstract_opt_state: Any,
                     data_iterator: Any = None) -> Restored:
    """`restore` of the newest step that reads. A newer step whose files fail to read is
    reported in one line and set aside (`locate.set_aside`, never deleted), so the run
    can save that step number again; the same on every process."""
    def attempt(step: int) -> Restored:
      try:
        restored, error = self._restore(step, abstract_params, abstract_opt_state,
                                        data_iterator), None
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 - judged below, the same on every process
        restored, error = None, e
      # 0: read, 1: a storage error, 2: another error, on the worst process.
      worst = _max_over_processes(0 if error is None else
                                  1 if locate.is_storage_error(error) else 2)
      if worst == 2:  # not a damaged step: no process may go on to an older one
        if error is not None and not locate.is_storage_error(error):
          raise error
        raise RuntimeError(f"step {step} failed to restore on another process")
      if worst == 1:
        raise error or OSError(f"step {step} is unreadable on another process")
      return restored

    def set_aside(step: int, error: BaseException) -> str:
      target = self.directory / f"{step}{locate.UNREADABLE}{locate.reason_slug(error)}"
      if jax.process_index() == 0:
        target = locate.set_aside(self.directory, step, error)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside step {step}")
      self._manager.reload()  # forget the step that is no longer there
      return f"moved to {target.name}"

    return locate.newest_readable(self.directory, attempt, list(self._manager.all_steps()),
                                  on_unreadable=set_aside).value

  def _restore(self, step: int, abstract_params: Any, abstract_opt_state: Any,
               data_iterator: Any) -> Restored:
    self._check_params(step, abstract_params)
    items = dict(params=ocp.args.StandardRestore(abstract_params),
                 opt_state=ocp.args.StandardRestore(abstract_opt_state))
    if data_iterator is not None:
      self._check_data_processes(step)
      items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step, out.params, out.opt_state,
                    out.data if data_iterator is not None else None)

  def _check_params(self, step: int, abstract_params: Any) -> None:
    """From the step's metadata: the config's model has the saved params and shapes."""
    saved = params.saved_params(self.directory / str(step) / "params")
    flat = params.leaf_paths(abstract_params)
    where = f"{self.directory}/{step}"
    params.check_missing(saved, list(flat), where)
    params.check_shapes(saved, flat, list(flat), where)

  def _check_data_processes(self, step: int) -> None:
    """Each process restores its own data position (grain writes one file per process):
    a run saved by another number of processes cannot go on from it."""
    saved = sorted(p.name for p in (epath.Path(self.directory) / str(step) / "data").glob(
        "process_*-of-*.json"))
    if saved and f"-of-{jax.process_count()}.json" not in saved[0]:
      raise ConfigError(
          f"{self.directory}: step {step}'s data position was saved by "
          f"{saved[0].rsplit('-of-', 1)[1].removesuffix('.json')} processes and this run has "
          f"{jax.process_count()}: resume with as many processes as saved it (the mesh "
          "over their devices may differ)")

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


def _max_over_processes(value: int) -> int:
  """The largest of every process's `value` (a collective with several processes)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))
