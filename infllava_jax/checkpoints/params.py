"""Reading params alone from either format (a run's step or a converted checkpoint).

Both keep the param tree as an Orbax PyTree in FOLDER/params; these functions read its
metadata, or some of its arrays, into a target's dtypes and shardings. Where FOLDER is a
run, `locate.read_checkpoint` picks the step.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from infllava_jax.checkpoints import converted, locate
from infllava_jax.errors import ConfigError


class ParamMismatchError(ConfigError):
  """The model a config builds and the params a checkpoint holds disagree."""


def abstract_tree(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings` (a matching tree,
  or one sharding for every leaf): the restore target."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def leaf_paths(tree: Any) -> dict[str, Any]:
  """{'/'-joined key path: leaf} of `tree`, through pytree nodes such as a quantised
  kernel's QArray (.../kernel/array/qvalue), as Orbax stores them."""
  def name(key) -> str:
    return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

  return {"/".join(name(k) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_params(directory: epath.Path) -> dict[str, Any]:
  """{'/'-joined path: metadata with .shape and .dtype} of the Orbax param tree in
  `directory` (a params/ folder), read without loading any array.

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


def select(flat: dict, include: Sequence[str], where: str) -> list[str]:
  """The paths of `flat` some `include` regex matches; a regex matching none raises (a typo
  must not silently leave a module at its random init)."""
  unmatched = [p for p in include if not any(re.search(p, k) for k in flat)]
  if unmatched:
    raise ParamMismatchError(
        f"{where}: include regex {', '.join(map(repr, unmatched))} matches no param of the "
        f"model; its top-level names are {sorted({k.split('/')[0] for k in flat})}")
  return [k for k in flat if any(re.search(p, k) for p in include)]


def check_shapes(saved: dict, flat: dict, selected: Sequence[str], where: str) -> None:
  """Raises ParamMismatchError naming the first selected param whose saved shape is not
  the target's, both shapes, and how many differ."""
  wrong = [k for k in selected if tuple(saved[k].shape) != tuple(flat[k].shape)]
  if wrong:
    k = wrong[0]
    more = f" (and {len(wrong) - 1} more params)" if len(wrong) > 1 else ""
    raise ParamMismatchError(
        f"{where}: param {k} is saved with shape {tuple(saved[k].shape)} but the config's "
        f"model has {tuple(flat[k].shape)}{more}: the config differs from the one that "
        "saved it")


def check_missing(saved: dict, selected: Sequence[str], where: str) -> None:
  missing = [k for k in selected if k not in saved]
  if missing:
    raise ParamMismatchError(
        f"{where}: params {missing[:5]} (of {len(missing)}) missing from the checkpoint: "
        "the config's model differs from the one that saved it")


@functools.cache
def _replicated() -> NamedSharding:
  return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())


def read(directory: epath.Path, wanted: dict[str, Any]) -> dict[str, Any]:
  """Reads only the `wanted` {path: array or ShapeDtypeStruct} leaves of the param tree in
  `directory`, each cast to its dtype and laid out in its sharding (replicated where it
  has none)."""
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


def restore_folder(folder: epath.Path, target: Any,
                   include: Sequence[str] | None = None) -> Any:
  """`restore_params_only` for one folder holding params/ (a step or a converted one)."""
  directory = folder / converted.PARAMS_DIR
  flat = traverse_util.flatten_dict(target, sep="/")
  selected = list(flat) if include is None else select(flat, include, str(folder))
  saved = saved_params(directory)
  check_missing(saved, selected, str(directory))
  check_shapes(saved, flat, selected, str(directory))
  flat.update(read(directory, {k: flat[k] for k in selected}))
  return traverse_util.unflatten_dict(flat, sep="/")


def restore_params_only(path: str | os.PathLike, target: Any,
                        include: Sequence[str] | None = None,
                        step: int | None = None) -> Any:
  """Params from a checkpoint, optionally only a subset (one source; a new run combines
  several with `init_sources.plan_init` / `read_init`).

  Args:
    path: a run folder (its newest step that reads, or `step`), one step folder, or a
      converted checkpoint (`converted.py`).
    target: the nested-dict param tree to fill: arrays or `ShapeDtypeStruct`s (with
      shardings; none means replicated). Leaves whose '/'-joined path matches an `include`
      regex (all leaves if None) are read from the checkpoint, cast to the target's dtype,
      in the target's sharding; the others are returned from `target` unchanged (e.g.
      fresh init, or weights converted from Hugging Face).

  Only the selected arrays are read. A regex selecting nothing, a selected path missing
  from the checkpoint, or one saved with another shape raises ParamMismatchError naming it.
  """
  return locate.read_checkpoint(path, step, lambda f: restore_folder(f, target, include))[1]


class LazyParam:
  """One saved param: `shape` and `dtype` from the metadata, read when made an array."""

  def __init__(self, directory: epath.Path, path: str, shape: tuple, dtype: np.dtype):
    self.directory, self.path, self.shape, self.dtype = directory, path, shape, dtype

  def __array__(self, dtype=None, copy=None):
    del copy  # a fresh array every time
    wanted = {self.path: jax.ShapeDtypeStruct(self.shape, self.dtype)}
    array = np.asarray(read(self.directory, wanted)[self.path])
    return array if dtype is None else array.astype(dtype)


def lazy_folder(folder: epath.Path) -> dict[str, LazyParam]:
  """{'/'-joined path: LazyParam} of the param tree in `folder`/params, in their saved
  dtypes. Each is read only when used, so a tool can walk a tree larger than host memory
  one param at a time."""
  directory = folder / converted.PARAMS_DIR
  return {k: LazyParam(directory, k, tuple(meta.shape), np.dtype(meta.dtype))
          for k, meta in saved_params(directory).items()}


def lazy_params(path: str | os.PathLike, step: int | None = None) -> dict[str, LazyParam]:
  """`lazy_folder` of the checkpoint at `path` (a run: `step`, or its newest step whose
  metadata reads)."""
  return locate.read_checkpoint(path, step, lazy_folder)[1]
