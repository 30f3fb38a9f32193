"""Where a checkpoint's params and config are: run folders, step folders, converted folders.

Every command takes one of
  a run's workdir           WORKDIR/checkpoints/<step>/{params,opt_state,data,config}
  its checkpoints/ folder   <step>/...
  one step folder           params/ (+ config/ ...)
  a converted checkpoint    params/ + model_config.json (+ tokenizer/)

Without a step, a run gives its newest step that can be read: `newest_readable` tries the
steps newest first, and a step whose files fail to read (truncated, missing, corrupt) is
reported in one line and skipped. `--step N` on such a step is an error naming it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, NamedTuple, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict

from infllava_jax.checkpoints import converted
from infllava_jax.errors import ConfigError

RUN_CHECKPOINTS = "checkpoints"  # a training run's steps live in WORKDIR/checkpoints
UNREADABLE = ".unreadable-"      # <step>.unreadable-<reason>: a damaged step set aside

T = TypeVar("T")


class UnreadableStepError(ConfigError):
  """A checkpoint step whose files cannot be read (truncated, missing or corrupt)."""


def absolute(path: str | os.PathLike) -> epath.Path:
  """Orbax writes only to absolute paths: a local relative one is resolved against the
  working directory; a URL (gs://...) stays as it is."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def run_checkpoints(path: str | os.PathLike) -> epath.Path:
  """The folder of saved steps for a run's workdir, or `path` itself otherwise."""
  path = absolute(path)
  return path / RUN_CHECKPOINTS if (path / RUN_CHECKPOINTS).is_dir() else path


def complete_steps(path: str | os.PathLike) -> list[int]:
  """The complete steps Orbax finds in a run's checkpoint folder (none if it is missing)."""
  path = absolute(path)
  if not path.is_dir():
    return []
  # Finalized steps only: a save cut short leaves a temporary folder, never a step.
  return sorted(ocp.utils.checkpoint_steps(path))


def is_step_folder(path: epath.Path) -> bool:
  """A folder holding params/ itself: one step of a run, or a converted checkpoint."""
  return (path / converted.PARAMS_DIR).is_dir()


def is_run(path: str | os.PathLike) -> bool:
  """A run's workdir or checkpoints/ folder with at least one complete step."""
  path = absolute(path)
  return not is_step_folder(path) and bool(complete_steps(run_checkpoints(path)))


def step_folder(path: str | os.PathLike, step: int) -> epath.Path:
  """Folder of `step` of the run at `path` (its workdir or checkpoints/ folder); a step
  that is not there raises FileNotFoundError listing those that are."""
  runs = run_checkpoints(path)
  steps = complete_steps(runs)
  if step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} not in {runs}; complete steps there: "
                            f"{steps}")
  return runs / str(step)


def describe_error(error: BaseException) -> str:
  """An exception as one short line. Storage errors run to many lines (TensorStore's
  spec); the innermost cause usually says what failed in one, e.g. 'OUT_OF_RANGE: Error
  reading "llm.embed/0.0" ...: Requested byte range [0, 14952) is not valid for value of
  size 1000'."""
  chain = [error]
  while (cause := chain[-1].__cause__ or chain[-1].__context__) and cause not in chain:
    chain.append(cause)
  texts = [" ".join(str(e).split()) for e in reversed(chain)]
  text = next((t for t in texts if t and len(t) <= 400), texts[0] or type(error).__name__)
  return text if len(text) <= 400 else text[:397] + "..."


# TensorStore's status codes for data that is missing, cut short or corrupt.
_STORAGE_STATUS = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|"
                             r"INVALID_ARGUMENT|INTERNAL|UNKNOWN): ")


def is_storage_error(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) says a file is missing, cut short or
  corrupt: an OSError, undecodable JSON, or a TensorStore status (DATA_LOSS, OUT_OF_RANGE,
  NOT_FOUND, ...). Other errors (a tree that does not match, a bug) are not a damaged
  step's, and an older step must not hide them."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    if isinstance(error, (OSError, json.JSONDecodeError, UnicodeDecodeError)) or \
        _STORAGE_STATUS.match(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def warn(message: str) -> None:
  """One line on stderr (process 0 of a multi-process run)."""
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def reason_slug(error: BaseException) -> str:
  """A file-name-safe word for why a step failed: its TensorStore status ('out-of-range',
  'data-loss', ...) or else its exception type ('jsondecodeerror')."""
  codes = re.findall(r"\b(DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|"
                     r"OUT_OF_RANGE|INTERNAL|UNKNOWN)\b", describe_error(error))
  return codes[0].lower().replace("_", "-") if codes else type(error).__name__.lower()


class Readable(NamedTuple):
  step: int
  value: object


def newest_readable(runs: epath.Path, read: Callable[[int], T], steps: list[int] | None = None,
                    on_unreadable: Callable[[int, BaseException], str | None] | None = None
                    ) -> Readable:
  """`read(step)` for the newest of `steps` (default: the complete steps of `runs`) that
  reads without a storage error.

  A step whose read raises a storage error (`is_storage_error`; not, e.g., a config whose
  model differs from the saved one, which an older step would not fix) is skipped for the
  next older one. Once one reads, each skipped step is reported in one line on stderr,
  after `on_unreadable(step, error)` has acted on it (`set_aside`) and returned a note for
  that line. When none reads, nothing is acted on: UnreadableStepError names every step.
  Each step is read once: the check is the read itself.
  """
  steps = sorted(complete_steps(runs) if steps is None else steps, reverse=True)
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint step in {runs}")
  skipped: list[tuple[int, BaseException]] = []
  for step in steps:
    try:
      value = read(step)
    except Exception as error:  # noqa: BLE001 - a storage error: try an older step
      if not is_storage_error(error):
        raise
      skipped.append((step, error))
      continue
    for bad, error in skipped:
      note = on_unreadable(bad, error) if on_unreadable is not None else None
      warn(f"{runs}/{bad} is unreadable ({describe_error(error)}); "
           f"{note + '; ' if note else ''}using step {step} instead")
    return Readable(step, value)
  raise UnreadableStepError(
      f"{runs}: no checkpoint step reads; "
      + "; ".join(f"step {s}: {describe_error(e)}" for s, e in skipped))


def read_step(runs: epath.Path, step: int, read: Callable[[int], T]) -> T:
  """`read(step)` for a step the user named: a storage error becomes one line naming it."""
  try:
    return read(step)
  except Exception as error:  # noqa: BLE001 - the storage layer raises many types
    if not is_storage_error(error):
      raise
    older = [s for s in complete_steps(runs) if s < step]
    hint = f"; an older step may read: --step {older[-1]}" if older else ""
    raise UnreadableStepError(f"{runs}/{step} is unreadable ({describe_error(error)})"
                              f"{hint}") from error


def read_checkpoint(path: str | os.PathLike, step: int | None,
                    read: Callable[[epath.Path], T]) -> tuple[int | None, T]:
  """(step, `read(folder)`) for any checkpoint `path`, `folder` holding params/.

  A step folder or converted checkpoint is read as it is (step None; a `step` given
  raises ConfigError). A run reads `step` (`read_step`), or else its newest step that
  reads (`newest_readable`: a damaged newer step is reported and skipped, left in place).
  """
  path = absolute(path)
  if is_step_folder(path):
    if step is not None:
      what = "a converted checkpoint" if converted.is_converted(path) else "a single step"
      raise ConfigError(f"{path} is {what}, not a run: --step {step} cannot apply")
    return (int(path.name) if path.name.isdigit() else None), read(path)
  runs = run_checkpoints(path)
  if step is not None:
    folder = step_folder(runs, step)
    return step, read_step(runs, step, lambda _: read(folder))
  if not complete_steps(runs):
    raise FileNotFoundError(
        f"{os.fspath(path)} is not a checkpoint: no {converted.PARAMS_DIR}/ folder and no "
        f"complete step in {runs} (expected a run's workdir, one of its step folders, or a "
        f"converted checkpoint: {converted.PARAMS_DIR}/ + {converted.CONFIG_FILE})")
  found = newest_readable(runs, lambda s: read(runs / str(s)))
  return found.step, found.value


def set_aside(runs: epath.Path, step: int, error: BaseException) -> epath.Path:
  """Renames the damaged `step` to `<step>.unreadable-<reason>[-n]` beside it: kept for
  inspection, no longer a step to Orbax (its step-name parser wants digits), so the run
  can save that step number again. Returns the new path."""
  base = runs / f"{step}{UNREADABLE}{reason_slug(error)}"
  target, n = base, 1
  while target.exists():
    n += 1
    target = epath.Path(f"{base}-{n}")
  (runs / str(step)).rename(target)
  return target


def read_run_config(path: epath.Path) -> ConfigDict:
  """The run config `Checkpointer` stores in a step's config/ item."""
  directory = path / "config"
  if not directory.is_dir():
    raise ConfigError(f"{directory}: no run config stored with this checkpoint")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    return ConfigDict(checkpointer.restore(directory, args=ocp.args.JsonRestore()))


def folder_config(folder: epath.Path) -> ConfigDict:
  """The config stored in a folder holding params/: a run step's whole config, or a
  converted checkpoint's model (and `data.tokenizer_path`, its DIR/tokenizer, when the
  conversion copied one)."""
  if converted.is_converted(folder):
    config = ConfigDict({"model": converted.read_model_config(folder)})
    tokenizer = converted.tokenizer_dir(folder)
    if tokenizer:
      config.data = ConfigDict({"tokenizer_path": tokenizer})
    return config
  if not (folder / "config").is_dir():
    raise ConfigError(f"{folder}: neither {converted.CONFIG_FILE} nor a run config "
                      "(config/) stored with these params")
  return read_run_config(folder)


def checkpoint_config(path: str | os.PathLike, step: int | None = None) -> ConfigDict:
  """`folder_config` of a checkpoint (for a run: `step`, or its newest step that reads)."""
  return read_checkpoint(path, step, folder_config)[1]
