"""`infllava inspect DIR`: what a checkpoint holds, from metadata only (no tensor is read).

DIR is a converted checkpoint (model_config.json + params/), a training run (its workdir or
checkpoints/ folder: its newest step whose metadata reads, or `--step`; or one step folder),
a PyTorch checkpoint folder (safetensors shards with or without an index, or .bin files) or
a single weights file. Prints every tensor's name, shape and dtype, then the parameter count
per module.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict

from infllava_jax.convert.mapping import ConversionError


def orbax_entries(path: str, step: int | None = None
                  ) -> tuple[int | None, list[tuple[str, tuple[int, ...], str]]]:
  """(step, entries) of a converted checkpoint or a run's step (None: its newest that
  reads), from the param tree's metadata."""
  from infllava_jax.checkpoints import locate, params
  step, lazy = locate.read_checkpoint(path, step, params.lazy_folder)
  return step, [(name, p.shape, str(p.dtype)) for name, p in sorted(lazy.items())]


def pytorch_entries(path: str) -> list[tuple[str, tuple[int, ...], str]]:
  from infllava_jax.convert import readers
  return [(name, ref.shape, str(ref.dtype))
          for name, ref in sorted(readers.folder_refs(path).items())]


def module_of(name: str) -> str:
  """The module a tensor belongs to: its first two name parts, layer indices dropped
  ('llm/layers/attn/q/kernel' -> 'llm/layers', 'model.layers.3.mlp...' -> 'model.layers')."""
  sep = "/" if "/" in name else "."
  parts = [p for p in name.split(sep) if not re.fullmatch(r"\d+", p)]
  return sep.join(parts[:2])


def report(entries: list[tuple[str, tuple[int, ...], str]], show_tensors: bool = True) -> str:
  lines = []
  if show_tensors:
    width = max((len(n) for n, _, _ in entries), default=0)
    lines += [f"{name:<{width}}  {str(list(shape)):<20} {dtype}" for name, shape, dtype in entries]
    lines.append("")
  counts: dict[str, int] = defaultdict(int)
  for name, shape, _ in entries:
    counts[module_of(name)] += math.prod(shape)
  width = max((len(m) for m in counts), default=0)
  lines.append(f"{'module':<{width}}  parameters")
  lines += [f"{module:<{width}}  {count:,}" for module, count in sorted(counts.items())]
  lines.append(f"{'total':<{width}}  {sum(counts.values()):,} in {len(entries)} tensors")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="infllava inspect",
      description="List the tensors (name, shape, dtype) and per-module parameter counts of "
                  "a converted checkpoint, a training run (workdir, checkpoints/ or step "
                  "folder) or a PyTorch checkpoint (folder or file).")
  parser.add_argument("path", help="checkpoint folder, run folder or weights file")
  parser.add_argument("--step", type=int, default=None,
                      help="step of a training run (default: its newest that reads)")
  parser.add_argument("--summary", action="store_true", help="only the per-module counts")
  parser.add_argument("--grep", metavar="REGEX", help="only tensors whose name matches")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  from infllava_jax.checkpoints import converted, locate
  try:
    if converted.is_converted(args.path):
      _, entries = orbax_entries(args.path, args.step)
      print(f"{args.path}: converted checkpoint")
    elif locate.is_step_folder(locate.absolute(args.path)) or locate.is_run(args.path):
      step, entries = orbax_entries(args.path, args.step)
      print(f"{args.path}: training run, step {step}")
    else:
      if args.step is not None:
        parser.error(f"--step applies to a training run; {args.path} is not one")
      entries = pytorch_entries(args.path)
      print(f"{args.path}: PyTorch checkpoint")
  except (ConversionError, FileNotFoundError) as err:
    print(f"infllava inspect: error: {err}", file=sys.stderr)
    return 1
  if args.grep:
    entries = [e for e in entries if re.search(args.grep, e[0])]
  print(report(entries, show_tensors=not args.summary))
  return 0
