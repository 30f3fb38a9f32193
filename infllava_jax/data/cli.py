"""`infllava data ...`: data tools.

  infllava data synth --out DIR --num N [--split all|train|heldout] [--num-heldout K]
                      [--seed S] [--image-size PX] [--max-turns T] [--kinds pattern,letter,count]
      Writes the synthetic fine-detail set as LLaVA JSON + PNGs (DIR/<split>.json,
      DIR/images/<split>/) and as a TFDS array_record dataset (DIR/tfds/...).

  infllava data pack --json FILE.json --images DIR --out DIR [--shards N] [--max-side PX]
                     [--skip-bad] [--template llama3|plain] [--workers W]
      Packs a LLaVA JSON and its images into N ArrayRecord shards + index.json (layout in
      data/pack.py), for data.source="array_record", data.path=DIR. Paths may be local or
      gs:// (etils.epath). Run again to resume an interrupted pack.
"""

from __future__ import annotations

import argparse
import os
import sys

from infllava_jax.data.synthetic import DEFAULT_KINDS, KINDS, check_kinds


def _usable_cores() -> int:
  """The cores this process may run on (its affinity mask where the OS has one)."""
  affinity = getattr(os, "sched_getaffinity", None)
  return len(affinity(0)) if affinity else os.cpu_count() or 1


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="infllava data", description="Data tools for infllava-jax.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  synth = sub.add_parser(
      "synth", help="write the synthetic fine-detail VQA set",
      description=("Writes the synthetic fine-detail set (1-px patterns over the image, or "
                   "3x3 grids with a small letter or dot group in the cell a question names) "
                   "as LLaVA JSON + PNG images and as a TFDS array_record dataset. Records "
                   "depend only on (split, seed, index, kinds)."))
  synth.add_argument("--out", required=True, help="output folder")
  synth.add_argument("--num", type=int, required=True, help="records of the train split")
  synth.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                     help="which split(s) to write (default: %(default)s)")
  synth.add_argument("--num-heldout", type=int, default=None,
                     help="records of the held-out split (default: max(1, num // 10))")
  synth.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
  synth.add_argument("--image-size", type=int, default=252,
                     help="image side in pixels (default: 252)")
  synth.add_argument("--max-turns", type=int, default=1,
                     help="questions per image of the letter and count kinds (default: 1)")
  synth.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                     help=f"comma-separated question kinds out of {','.join(KINDS)} "
                          "(default: %(default)s, the main job's)")
  packer = sub.add_parser(
      "pack", help="pack a LLaVA JSON + images into ArrayRecord shards",
      description=("Packs the records of a LLaVA JSON (id, conversations and the image's "
                   "encoded bytes) into ArrayRecord shards plus OUT/index.json, for "
                   "data.source='array_record' with data.path=OUT. Bad records stop the "
                   "pack (or, with --skip-bad, are counted and left out), as in training. "
                   "Run again with the same arguments to finish an interrupted pack."))
  packer.add_argument("--json", required=True, help="the LLaVA JSON (local or gs://...)")
  packer.add_argument("--images", required=True,
                      help="the folder the records' image paths are relative to")
  packer.add_argument("--out", required=True, help="output folder (local or gs://...)")
  packer.add_argument("--shards", type=int, default=1, help="shard files (default: 1)")
  packer.add_argument("--max-side", type=int, default=None,
                      help="shrink and re-encode images whose longer side exceeds PX "
                           "(default: store every image's bytes as they are)")
  packer.add_argument("--skip-bad", action="store_true",
                      help="leave bad records out (counted) instead of stopping")
  packer.add_argument("--template", choices=("llama3", "plain"), default="llama3",
                      help="the template the records are checked for (default: %(default)s)")
  packer.add_argument("--workers", type=int, default=_usable_cores(),
                      help="processes writing shards at once (default: the cores this process may use)")
  return parser


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  if args.command == "pack":
    from infllava_jax.data.pack import pack
    index = pack(args.json, args.images, args.out, num_shards=args.shards,
                 max_side=args.max_side, skip_bad=args.skip_bad, template=args.template,
                 workers=args.workers, progress=lambda msg: print(msg, flush=True))
    print(f"wrote {index['records']} records in {len(index['shards'])} shards "
          f"({index['skipped']} skipped): {args.out}")
  if args.command == "synth":
    from infllava_jax.data.sources import write_synthetic
    if args.num < 1:
      print("infllava data synth: --num must be >= 1", file=sys.stderr)
      return 2
    try:
      kinds = check_kinds(k.strip() for k in args.kinds.split(","))
    except ValueError as e:
      print(f"infllava data synth: --kinds: {e}", file=sys.stderr)
      return 2
    num_heldout = args.num_heldout or max(1, args.num // 10)
    splits = {"train": args.num, "heldout": num_heldout}
    if args.split != "all":
      splits = {args.split: args.num if args.split == "train" else num_heldout}
    written = write_synthetic(args.out, splits, args.seed, args.image_size, args.max_turns, kinds,
                              progress=lambda msg: print(msg, flush=True))
    for what, path in written.items():
      print(f"wrote {what}: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
