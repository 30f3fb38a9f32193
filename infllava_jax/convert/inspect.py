"""`infllava inspect DIR`: what a checkpoint holds, from metadata only (no tensor is read).

DIR is a converted checkpoint (model_config.json + params/), a PyTorch checkpoint folder
(safetensors shards with or without an index, or .bin files) or a single weights file.
Prints every tensor's name, shape and dtype, then the parameter count per module.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict

from infllava_jax.convert.mapping import ConversionError


def converted_entries(directory: str) -> list[tuple[str, tuple[int, ...], str]]:
  from flax import traverse_util
  from infllava_jax.convert import checkpoint_io
  flat = traverse_util.flatten_dict(checkpoint_io.params_metadata(directory), sep="/")
  return [(path, tuple(meta.shape), str(meta.dtype)) for path, meta in sorted(flat.items())]


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
                  "a converted checkpoint or a PyTorch checkpoint (folder or file).")
  parser.add_argument("path", help="checkpoint folder or weights file")
  parser.add_argument("--summary", action="store_true", help="only the per-module counts")
  parser.add_argument("--grep", metavar="REGEX", help="only tensors whose name matches")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  from infllava_jax.convert import checkpoint_io
  try:
    if checkpoint_io.is_converted(args.path):
      entries = converted_entries(args.path)
      print(f"{args.path}: converted checkpoint")
    else:
      entries = pytorch_entries(args.path)
      print(f"{args.path}: PyTorch checkpoint")
  except (ConversionError, FileNotFoundError) as err:
    print(f"infllava inspect: error: {err}", file=sys.stderr)
    return 1
  if args.grep:
    entries = [e for e in entries if re.search(args.grep, e[0])]
  print(report(entries, show_tensors=not args.summary))
  return 0
