"""Where a new run's params come from: several checkpoints applied in order.

`infllava train --init_base A --init_from B` gives [InitSource(A), InitSource(B, include)]:
`plan_init` checks them from metadata alone (which source gives each param; names, shapes),
`read_init` then reads each param once, from the last source that gives it; e.g. a
converted LLaMA-3 + CLIP checkpoint, then a stage-1 run's DEM + projector.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

from etils import epath
from flax import traverse_util

from infllava_jax.checkpoints import converted, locate, params


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
  root = locate.absolute(path)
  if locate.is_step_folder(root):
    if converted.is_converted(root):
      return root / converted.PARAMS_DIR, "converted"
    kind = f"step {root.name}" if root.name.isdigit() else "params"
    return root / converted.PARAMS_DIR, kind
  runs = locate.run_checkpoints(root)
  steps = locate.complete_steps(runs)
  if not steps:
    why = "does not exist" if not root.exists() else (
        f"holds no complete checkpoint step (looked in {runs}) and no params/ folder")
    raise FileNotFoundError(
        f"init source {os.fspath(path)}: {why}; expected a run folder (WORKDIR with "
        f"{locate.RUN_CHECKPOINTS}/<step>/params) or a converted checkpoint (params/ + "
        f"{converted.CONFIG_FILE}, from `infllava convert from-pytorch`)")
  return runs / str(max(steps)) / converted.PARAMS_DIR, f"step {max(steps)}"


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
    saved = params.saved_params(directory)
    ignored = ()
    if source.include is None:
      selected = [k for k in flat if k in saved]
      ignored = tuple(k for k in saved if k not in flat)
      if not selected:
        raise params.ParamMismatchError(
            f"{where}: holds none of the model's params (its top-level names: "
            f"{sorted({k.split('/')[0] for k in saved})}; the model's: "
            f"{sorted({k.split('/')[0] for k in flat})})")
    else:
      selected = params.select(flat, source.include, where)
      missing = [k for k in selected if k not in saved]
      if missing:
        raise params.ParamMismatchError(
            f"{where}: params {missing[:5]} (of {len(missing)}) selected by include "
            f"{tuple(source.include)} are not in it")
    params.check_shapes(saved, flat, selected, where)
    chosen.append((source, directory, kind, selected, ignored))
  last = {k: i for i, c in enumerate(chosen) for k in c[3]}
  return [InitPlan(source, directory, kind, tuple(k for k in selected if last[k] == i), ignored)
          for i, (source, directory, kind, selected, ignored) in enumerate(chosen)]


def read_init(plans: Sequence[InitPlan], target: Any) -> dict[str, Any]:
  """{path: array} of every planned param, cast to the target's dtype, in its sharding
  (each param is read from the one source that finally gives it). A source whose files
  fail to read raises UnreadableStepError naming it."""
  flat = traverse_util.flatten_dict(target, sep="/")
  out: dict[str, Any] = {}
  for plan in plans:
    try:
      out.update(params.read(plan.directory, {k: flat[k] for k in plan.paths}))
    except Exception as error:  # noqa: BLE001 - the storage layer raises many types
      if not locate.is_storage_error(error):
        raise
      raise locate.UnreadableStepError(
          f"init source {os.fspath(plan.source.path)} ({plan.kind}): {plan.directory} is "
          f"unreadable ({locate.describe_error(error)})") from error
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
