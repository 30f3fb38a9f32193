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

A new run's params may come from several `InitSource`s applied in order (`plan_init`
checks them from metadata, `read_init` reads each param once, from the last source that
gives it): e.g. a converted LLaMA-3 + CLIP checkpoint, then a stage-1 run's DEM + projector.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import threading
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from grain import checkpoint as grain_checkpoint
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from infllava_jax.config import ConfigError
from infllava_jax.convert import checkpoint_io


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
      self._check_data_processes(step)
      items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step, out.params, out.opt_state,
                    out.data if data_iterator is not None else None)

  def _check_data_processes(self, step: int) -> None:
    """Each process restores its own data position (grain writes one file per process):
    a run saved by another number of processes cannot go on from it."""
    saved = sorted(p.name for p in (epath.Path(self.directory) / str(step) / "data").glob(
        "process_*-of-*.json"))
    if saved and f"-of-{jax.process_count()}.json" not in saved[0]:
      raise ValueError(
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


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings` (a matching tree,
  or one sharding for every leaf): the restore target."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _step_dir(path: epath.Path, step: int | None, item: str) -> epath.Path:
  """`path` itself when it holds `item`, else a step of the run folder `path` (a run's
  workdir or its checkpoints/ folder)."""
  if (path / item).is_dir():
    if step is not None:
      raise ValueError(f"{path} is a single checkpoint step; step={step} cannot apply")
    return path
  if (path / RUN_CHECKPOINTS).is_dir():
    path = path / RUN_CHECKPOINTS
  steps = complete_steps(path)
  if step is None:
    step = max(steps, default=None)
  if step is None or step not in steps:
    wanted = "complete checkpoint step" if step is None else f"checkpoint step {step}"
    raise FileNotFoundError(f"{path} is not a checkpoint: no {item!r} folder and no {wanted} "
                            f"(complete steps: {list(steps)})")
  return path / str(step)


def complete_steps(path: str | os.PathLike) -> list[int]:
  """The complete steps Orbax finds in a run's checkpoint folder (none if it is missing)."""
  path = absolute(path)
  if not path.is_dir():
    return []
  # Finalized steps only: a save cut short leaves a temporary folder, never a step.
  return sorted(ocp.utils.checkpoint_steps(path))


def _replicated() -> NamedSharding:
  return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())


def params_step(path: str | os.PathLike, step: int | None = None) -> int | None:
  """The step `restore_params_only(path, step=step)` reads: `step`, or a run's latest; None
  for a folder of params alone (a converted checkpoint, or one step folder given directly)."""
  path = absolute(path)
  directory = _step_dir(path, step, "params")
  return None if directory == path else int(directory.name)


def restore_params_only(path: str | os.PathLike, target: Any,
                        include: Sequence[str] | None = None,
                        step: int | None = None) -> Any:
  """Params from a checkpoint, optionally only a subset (one source; `Trainer` combines
  several with `plan_init` / `read_init`).

  Args:
    path: a run folder (its latest step, or `step`), one step folder, or any folder with an
      Orbax param tree in `path/params` (the converted format of `convert/checkpoint_io.py`).
    target: the nested-dict param tree to fill: arrays or `ShapeDtypeStruct`s (with
      shardings; none means replicated). Leaves whose '/'-joined path matches an `include`
      regex (all leaves if None) are read from the checkpoint, cast to the target's dtype,
      in the target's sharding; the others are returned from `target` unchanged (e.g.
      fresh init, or weights converted from Hugging Face).

  Only the selected arrays are read. A regex selecting nothing, a selected path missing
  from the checkpoint, or one saved with another shape raises ValueError naming it.
  """
  directory = _step_dir(absolute(path), step, "params") / "params"
  flat = traverse_util.flatten_dict(target, sep="/")
  selected = list(flat) if include is None else _select(flat, include, str(path))
  saved = _saved_params(directory)
  missing = [k for k in selected if k not in saved]
  if missing:
    raise ValueError(f"{directory}: params {missing[:5]} (of {len(missing)}) missing from "
                     "the checkpoint")
  _check_shapes(saved, flat, selected, str(directory))
  flat.update(_read(directory, {k: flat[k] for k in selected}))
  return traverse_util.unflatten_dict(flat, sep="/")


class LazyParam:
  """One saved param: `shape` and `dtype` from the metadata, read when made an array."""

  def __init__(self, directory: epath.Path, path: str, shape: tuple, dtype: np.dtype):
    self.directory, self.path, self.shape, self.dtype = directory, path, shape, dtype

  def __array__(self, dtype=None, copy=None):
    del copy  # a fresh array every time
    wanted = {self.path: jax.ShapeDtypeStruct(self.shape, self.dtype)}
    array = np.asarray(_read(self.directory, wanted)[self.path])
    return array if dtype is None else array.astype(dtype)


def lazy_params(path: str | os.PathLike, step: int | None = None) -> dict[str, LazyParam]:
  """{'/'-joined path: LazyParam} of the params `restore_params_only(path, step=step)` would
  read, in their saved dtypes. Each is read only when used, so a tool can walk a tree
  larger than host memory one param at a time."""
  directory = _step_dir(absolute(path), step, "params") / "params"
  return {k: LazyParam(directory, k, tuple(meta.shape), np.dtype(meta.dtype))
          for k, meta in _saved_params(directory).items()}


def _select(flat: dict, include: Sequence[str], where: str) -> list[str]:
  """The paths of `flat` some `include` regex matches; a regex matching none raises (a typo
  must not silently leave a module at its random init)."""
  unmatched = [p for p in include if not any(re.search(p, k) for k in flat)]
  if unmatched:
    raise ValueError(f"{where}: include regex {', '.join(map(repr, unmatched))} matches no "
                     f"param of the model; its top-level names are "
                     f"{sorted({k.split('/')[0] for k in flat})}")
  return [k for k in flat if any(re.search(p, k) for p in include)]


def _saved_params(directory: epath.Path) -> dict[str, Any]:
  """{'/'-joined path: metadata with .shape} of the Orbax param tree in `directory`.

  Asks the handler, not a `PyTreeCheckpointer`: the checkpointer also looks for step
  metadata inside the item folder, where `CheckpointManager` never writes it (it lives one
  level up), and logged "Metadata file does not exist" on every load of a run.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(directory).tree
  finally:
    handler.close()
  return traverse_util.flatten_dict(tree, sep="/")


def _check_shapes(saved: dict, flat: dict, selected: Sequence[str], where: str) -> None:
  wrong = [f"{k}: saved {tuple(saved[k].shape)}, target {tuple(flat[k].shape)}"
           for k in selected if tuple(saved[k].shape) != tuple(flat[k].shape)]
  if wrong:
    raise ValueError(f"{where}: shape mismatch with the config's model ({len(wrong)} "
                     f"params): {wrong[:5]}")


def _read(directory: epath.Path, wanted: dict[str, Any]) -> dict[str, Any]:
  """Reads only the `wanted` {path: array or ShapeDtypeStruct} leaves, each cast to its
  dtype and laid out in its sharding (replicated where it has none)."""
  if not wanted:
    return {}

  def abstract(x):
    sharding = getattr(x, "sharding", None) or _replicated()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  subset = traverse_util.unflatten_dict({k: abstract(x) for k, x in wanted.items()}, sep="/")
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=subset, restore_args=ocp.checkpoint_utils.construct_restore_args(subset),
        partial_restore=True))
  return traverse_util.flatten_dict(restored, sep="/")


class InitSource(NamedTuple):
  """Where a new run's params come from (`infllava train --init_base / --init_from`).

  path: a converted checkpoint (DIR/params + DIR/model_config.json), a run's workdir or
    checkpoints/ folder (its latest complete step), or one step folder.
  include: regexes over '/'-joined param paths: exactly those params are taken and all
    must be in the checkpoint. None: every param of the model the checkpoint holds.
  """
  path: str
  include: tuple[str, ...] | None = None


class InitPlan(NamedTuple):
  """One source, resolved: its param folder, what it is ('converted', 'step 2000'), the
  params it provides once later sources have taken theirs, and (include None) the params
  it holds that the model lacks."""
  source: InitSource
  directory: epath.Path
  kind: str
  paths: tuple[str, ...]
  ignored: tuple[str, ...] = ()


def locate_params(path: str | os.PathLike) -> tuple[epath.Path, str]:
  """(folder of the Orbax param tree, what it is) for an `--init_*` path; a path that is
  neither a run folder nor a converted checkpoint raises FileNotFoundError."""
  root = absolute(path)
  if (root / "params").is_dir():
    if (root / checkpoint_io.CONFIG_FILE).is_file():
      return root / "params", "converted"
    return root / "params", f"step {root.name}" if root.name.isdigit() else "params"
  runs = root / RUN_CHECKPOINTS if (root / RUN_CHECKPOINTS).is_dir() else root
  steps = complete_steps(runs)
  if not steps:
    why = "does not exist" if not root.exists() else (
        f"holds no complete checkpoint step (looked in {runs}) and no params/ folder")
    raise FileNotFoundError(
        f"init source {os.fspath(path)}: {why}; expected a run folder (WORKDIR with "
        f"{RUN_CHECKPOINTS}/<step>/params) or a converted checkpoint (params/ + "
        f"{checkpoint_io.CONFIG_FILE}, from `infllava convert from-pytorch`)")
  return runs / str(max(steps)) / "params", f"step {max(steps)}"


def plan_init(target: Any, sources: Sequence[InitSource]) -> list[InitPlan]:
  """Which source gives each param, checked from metadata alone (nothing is read yet).

  Sources apply in order, a later one overriding an earlier one where both give a param;
  params no source gives keep their fresh init. Raises, naming the path, regex or param:
  a source that is not a checkpoint; an include regex matching no param of the model; a
  selected param missing from its source; shapes that disagree with `target` (the
  config's model); a source (include None) holding none of the model's params.

  target: the model's param tree (arrays or ShapeDtypeStructs).
  """
  flat = traverse_util.flatten_dict(target, sep="/")
  chosen = []
  for source in sources:
    directory, kind = locate_params(source.path)
    where = f"init source {source.path} ({kind})"
    saved = _saved_params(directory)
    ignored = ()
    if source.include is None:
      selected = [k for k in flat if k in saved]
      ignored = tuple(k for k in saved if k not in flat)
      if not selected:
        raise ValueError(f"{where}: holds none of the model's params (its top-level names: "
                         f"{sorted({k.split('/')[0] for k in saved})}; the model's: "
                         f"{sorted({k.split('/')[0] for k in flat})})")
    else:
      selected = _select(flat, source.include, where)
      missing = [k for k in selected if k not in saved]
      if missing:
        raise ValueError(f"{where}: params {missing[:5]} (of {len(missing)}) selected by "
                         f"include {tuple(source.include)} are not in it")
    _check_shapes(saved, flat, selected, where)
    chosen.append((source, directory, kind, selected, ignored))
  last = {k: i for i, c in enumerate(chosen) for k in c[3]}
  return [InitPlan(source, directory, kind, tuple(k for k in selected if last[k] == i), ignored)
          for i, (source, directory, kind, selected, ignored) in enumerate(chosen)]


def read_init(plans: Sequence[InitPlan], target: Any) -> dict[str, Any]:
  """{path: array} of every planned param, cast to the target's dtype, in its sharding
  (each param is read from the one source that finally gives it)."""
  flat = traverse_util.flatten_dict(target, sep="/")
  out: dict[str, Any] = {}
  for plan in plans:
    out.update(_read(plan.directory, {k: flat[k] for k in plan.paths}))
  return out


def describe_init(plans: Sequence[InitPlan], paths: Sequence[str]) -> str:
  """One line naming where each top-level group of params comes from, e.g.
  "init: llm, vision from ckpt/base (converted); dem, projector from runs/stage1 (step
  2000)". A group split between places shows its share: "llm (2 of 9 params)". A source
  left with nothing to give, or holding params the model lacks, says so: either may be a
  mistake in the command or the config."""
  sizes: dict[str, int] = {}
  for p in paths:
    sizes[p.split("/")[0]] = sizes.get(p.split("/")[0], 0) + 1
  given = {k for plan in plans for k in plan.paths}
  places = [(f"from {os.fspath(plan.source.path)} ({plan.kind})", plan.paths)
            for plan in plans]
  places.append(("random init", [p for p in paths if p not in given]))
  parts = []
  for where, taken in places:
    counts: dict[str, int] = {}
    for p in taken:
      counts[p.split("/")[0]] = counts.get(p.split("/")[0], 0) + 1
    if counts:
      groups = [g if n == sizes[g] else f"{g} ({n} of {sizes[g]} params)"
                for g, n in sorted(counts.items())]
      parts.append(f"{', '.join(groups)} {where}")
  for plan in plans:
    name = f"{os.fspath(plan.source.path)} ({plan.kind})"
    if not plan.paths:
      parts.append(f"nothing from {name}: later sources give all it would")
    if plan.ignored:
      parts.append(f"{len(plan.ignored)} params of {name} not in the model, ignored "
                   f"(e.g. {plan.ignored[0]})")
  return "init: " + "; ".join(parts)


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


@jax.jit
def _any_true(flags: jax.Array) -> jax.Array:
  return jnp.any(flags)


@functools.cache
def _one_per_device() -> NamedSharding:
  return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
                       PartitionSpec("all"))


def _any_process(flag: bool) -> jax.Array:
  """Whether `flag` is true on any process: a scalar computed on the devices (not waited for)."""
  local = np.full((jax.local_device_count(),), flag, np.bool_)
  return _any_true(jax.make_array_from_process_local_data(_one_per_device(), local))


class PreemptionFlag:
  """Set by SIGTERM (or `signals`); the train loop polls it, saves and exits cleanly.

  Construct it in the main thread (Python's rule for signal handlers). `restore()` puts
  the previous handlers back.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self.signal: int | None = None
    self._exchange: jax.Array | None = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    self._event.set()

  def is_set(self) -> bool:
    """Whether this process received the signal."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Whether any process had received it by the previous call: the same answer on every
    process, and with one process whether it has been received.

    With several processes this is a collective: call it at the same steps everywhere.
    Each call queues this process's flag for an exchange behind the work in flight and
    reads the previous call's exchange, so a train loop that calls it after dispatching a
    step waits for the step before, not for that one: one step stays queued.
    """
    if jax.process_count() == 1:
      return self.is_set()
    previous, self._exchange = self._exchange, _any_process(self.is_set())
    return previous is not None and bool(previous)

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
