"""`infllava convert from-pytorch | to-pytorch`: PyTorch checkpoints <-> converted (Orbax).

  infllava convert from-pytorch --model INF-LLaVA-sft/ --out ckpt/
  infllava convert from-pytorch --llama Meta-Llama-3-8B-Instruct/ \
      --clip clip-vit-large-patch14-336/ [--projector mm_projector.bin] --out ckpt/
  infllava convert from-pytorch --llava-hf llava-1.5-7b-hf/ --out ckpt/
  infllava convert to-pytorch --checkpoint ckpt/ --out release/    # or a training run folder

Errors from the checkpoint (missing / unexpected / mis-shaped tensors, a bad file) are
printed as one list and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from infllava_jax.config import load_config
from infllava_jax.convert.mapping import ConversionError

DTYPES = ("float32", "bfloat16", "float16")


class Progress:
  """`[ 12/291 tensors, 1.20/16.07 GB] name` lines, at most one per `every` seconds."""

  def __init__(self, total_tensors: int, total_bytes: int, quiet: bool = False,
               every: float = 1.0):
    self.total_tensors, self.total_bytes = total_tensors, total_bytes
    self.tensors = self.bytes = 0
    self.quiet, self.every = quiet, every
    self._last = 0.0

  def __call__(self, name: str, nbytes: int) -> None:
    self.tensors += 1
    self.bytes += nbytes
    now = time.monotonic()
    if not self.quiet and (now - self._last >= self.every or self.tensors == self.total_tensors):
      self._last = now
      print(f"[{self.tensors:>5}/{self.total_tensors} tensors, {self.bytes / 1e9:6.2f}/"
            f"{self.total_bytes / 1e9:.2f} GB] {name}", flush=True)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="infllava convert",
      description="Convert checkpoints between PyTorch (INF-LLaVA release, HF LLaMA-3 + "
                  "CLIP, llava-hf) and this project's format (Orbax params + model_config.json).")
  commands = parser.add_subparsers(dest="command", required=True)

  src = commands.add_parser(
      "from-pytorch", help="PyTorch checkpoint -> converted checkpoint",
      description="Streams one tensor at a time into an Orbax checkpoint (DIR/params), "
                  "writes DIR/model_config.json and copies the source's tokenizer to "
                  "DIR/tokenizer. Give exactly one source: --model, --llama with --clip, or "
                  "--llava-hf.")
  src.add_argument("--out", required=True, help="new folder for the converted checkpoint")
  src.add_argument("--model", metavar="DIR",
                   help="INF-LLaVA release folder (config.json with model_type llava_llama, "
                        "*.safetensors + model.safetensors.index.json)")
  src.add_argument("--llama", metavar="DIR", help="Hugging Face LLaMA-3 folder (stage 1 start)")
  src.add_argument("--clip", metavar="DIR", help="Hugging Face CLIP folder (with --llama)")
  src.add_argument("--projector", metavar="FILE",
                   help="stage-1 mm_projector.bin (DEM + projector keys), with --llama/--clip; "
                        "without it the DEM and projector are initialised as PyTorch's "
                        "nn.Linear / nn.Conv2d defaults, as the reference's stage 1 starts")
  src.add_argument("--llava-hf", dest="llava_hf", metavar="DIR",
                   help="llava-hf LlavaForConditionalGeneration folder -> LLaVA-1.5 baseline")
  src.add_argument("--config", metavar="FILE.py[:ARG]",
                   help="config whose `model` section supplies what a checkpoint cannot "
                        "(DCM, DEM, CLIP heads); default configs/infllava_8b.py "
                        "(:llava for --llava-hf). Sizes found in the checkpoint win.")
  src.add_argument("--dtype", choices=DTYPES,
                   help="cast every param (default: keep each tensor's dtype, bf16 exact)")
  src.add_argument("--no-pad-row", dest="pad_row", action="store_false",
                   help="with --llama: keep the LLaMA vocabulary (default adds the reference's "
                        "<pad> token: one more embedding and lm_head row, the mean of the others)")
  src.add_argument("--seed", type=int, default=0,
                   help="init seed for the modules the checkpoint lacks (default: "
                        "%(default)s)")
  src.add_argument("--quiet", action="store_true", help="no progress lines")

  dst = commands.add_parser(
      "to-pytorch", help="converted checkpoint or training run -> INF-LLaVA release layout",
      description="Writes safetensors shards + model.safetensors.index.json + config.json "
                  "in the INF-LLaVA release layout (the released checkpoint's tensor names).")
  dst.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="converted checkpoint (DIR/params + DIR/model_config.json) or a "
                        "training run folder (its latest step)")
  dst.add_argument("--out", required=True, metavar="DIR", help="folder to write")
  dst.add_argument("--dtype", choices=DTYPES, help="cast every tensor (default: as stored)")
  dst.add_argument("--max-shard-size", dest="max_shard_size", type=float, default=5.0,
                   metavar="GB", help="largest shard in GB (default 5)")
  dst.add_argument("--quiet", action="store_true", help="no progress lines")
  return parser


def _source(args, parser):
  from infllava_jax.convert import hf
  config = load_config(args.config).model if args.config else None
  given = [name for name in ("model", "llama", "llava_hf") if getattr(args, name)]
  if len(given) != 1:
    parser.error("give exactly one source: --model DIR, --llama DIR --clip DIR, or --llava-hf DIR")
  if args.llama and not args.clip:
    parser.error("--llama needs --clip DIR")
  if (args.clip or args.projector) and not args.llama:
    parser.error("--clip and --projector go with --llama")
  if args.model:
    return hf.release_source(args.model, config)
  if args.llama:
    return hf.separate_source(args.llama, args.clip, args.projector, config, args.pad_row)
  return hf.llava_hf_source(args.llava_hf, config)


def from_pytorch(args, parser) -> None:
  from infllava_jax.checkpoints import converted
  from infllava_jax.convert import hf
  from infllava_jax.convert.mapping import flatten
  source = _source(args, parser)
  progress = Progress(0, 0, args.quiet)
  reader = hf.Reader(on_read=lambda ref: progress(ref.stored_name, ref.nbytes))
  model_cfg, params = hf.plan(source, reader, dtype=args.dtype, seed=args.seed)
  streamed = [leaf for leaf in flatten(params).values()
              if isinstance(leaf, converted.StreamedArray)]
  progress.total_tensors = sum(leaf.shape[0] if leaf.stacked else 1 for leaf in streamed)
  progress.total_bytes = sum(leaf.nbytes for leaf in streamed)
  if not args.quiet:
    print(f"{source.label}: {model_cfg.variant} model, {progress.total_tensors} tensors "
          f"({progress.total_bytes / 1e9:.2f} GB) to convert"
          + (f"; initialising {', '.join(source.init)} (PyTorch's default init)"
             if source.init else ""))
  converted.save_converted(args.out, model_cfg, params)
  folder = args.model or args.llama or args.llava_hf
  tokenizer = converted.save_tokenizer(args.out, folder)
  if tokenizer is None:
    print(f"note: {folder} holds no tokenizer ({', '.join(converted.TOKENIZER_FILES)}): "
          "give generate, chat, serve and evaluate the model's tokenizer folder with "
          "--tokenizer DIR", file=sys.stderr)
  if not args.quiet:
    print(f"wrote {args.out}" + (f" (tokenizer copied from {folder})" if tokenizer else ""))


def to_pytorch(args) -> None:
  from infllava_jax.convert import export
  progress = Progress(0, 0, args.quiet)
  def on_write(name, nbytes, total_tensors, total_bytes):
    progress.total_tensors, progress.total_bytes = total_tensors, total_bytes
    progress(name, nbytes)
  export.export_release(args.checkpoint, args.out, dtype=args.dtype,
                        max_shard_bytes=int(args.max_shard_size * 1e9), on_write=on_write)
  if not args.quiet:
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.command == "from-pytorch":
      from_pytorch(args, parser)
    else:
      to_pytorch(args)
  except (ConversionError, FileNotFoundError, FileExistsError) as err:
    print(f"infllava convert {args.command}: error: {err}", file=sys.stderr)
    return 1
  return 0
