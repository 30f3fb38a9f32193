"""`infllava convert from-pytorch | to-pytorch | quantize`: PyTorch checkpoints <-> converted
(Orbax), and converted checkpoints to weight-only quantised ones.

  infllava convert from-pytorch --model INF-LLaVA-sft/ --out ckpt/
  infllava convert from-pytorch --llama Meta-Llama-3-8B-Instruct/ \
      --clip clip-vit-large-patch14-336/ [--projector mm_projector.bin] --out ckpt/
  infllava convert from-pytorch --llava-hf llava-1.5-7b-hf/ --out ckpt/
  infllava convert from-pytorch --model llava-lora/ --model-base INF-LLaVA-sft/ --out ckpt/
      [--keep-lora]     # a PEFT LoRA folder over its base (any of the above; LLaMA: + --clip)
  infllava convert to-pytorch --checkpoint ckpt/ --out release/    # or a training run folder
  infllava convert to-pytorch --checkpoint lora-run/ --out llava-lora/ --lora-adapter
  infllava convert quantize --checkpoint ckpt/ --out ckpt-int8/ --bits 8   # or --bits 4 [--nf4]

`from-pytorch` takes `--config.a.b=value` overrides of its `--config`, as `infllava train`
does: `--config.model.dtype=float32` records float32 compute for a float32 source (the
default config computes in bfloat16, which `generate`, `chat`, `serve` and `evaluate`
then use unless given `--dtype`). It states the compute and param dtypes it records.

Errors from the checkpoint (missing / unexpected / mis-shaped tensors, a bad file) are
printed as one list and exit with status 1; a path that is not there, or an --out that
already holds a checkpoint, is one line and status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from infllava_jax.cli import user_error
from infllava_jax.config import config_help, load_config
from infllava_jax.convert.mapping import ConversionError
from infllava_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CONFIG = "infllava_8b"  # `convert.sources.base_config`'s; --llava-hf: its variant


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
                  "--llava-hf; or a LoRA folder --model with its --model-base.")
  src.add_argument("--out", required=True, help="new folder for the converted checkpoint")
  src.add_argument("--model", metavar="DIR",
                   help="INF-LLaVA release folder (config.json with model_type llava_llama, "
                        "*.safetensors + model.safetensors.index.json), or with --model-base "
                        "a LoRA folder as the reference saves one (adapter_config.json, "
                        "adapter_model.safetensors or .bin, non_lora_trainables.bin)")
  src.add_argument("--model-base", dest="model_base", metavar="BASE",
                   help="with a LoRA --model: the model it was trained on, a release or "
                        "llava-hf folder, or a Hugging Face LLaMA folder with --clip DIR; "
                        "the adapter is merged into it (W + B A alpha/r, float32), as the "
                        "reference's loader does")
  src.add_argument("--keep-lora", dest="keep_lora", action="store_true",
                   help="with --model-base: keep the adapter as LoRA params (kernel_lora_a, "
                        "kernel_lora_b) and write lora.json (rank, alpha) instead of merging")
  src.add_argument("--llama", metavar="DIR", help="Hugging Face LLaMA-3 folder (stage 1 start)")
  src.add_argument("--clip", metavar="DIR",
                   help="Hugging Face CLIP folder (with --llama, or a LLaMA --model-base)")
  src.add_argument("--projector", metavar="FILE",
                   help="stage-1 mm_projector.bin (DEM + projector keys), with --llama/--clip; "
                        "without it the DEM and projector are initialised as PyTorch's "
                        "nn.Linear / nn.Conv2d defaults, as the reference's stage 1 starts")
  src.add_argument("--llava-hf", dest="llava_hf", metavar="DIR",
                   help="llava-hf LlavaForConditionalGeneration folder -> LLaVA-1.5 baseline, "
                        "or LlavaNextForConditionalGeneration -> llava_next (AnyRes)")
  src.add_argument("--config", metavar="NAME|FILE.py[:ARG]",
                   help="config whose `model` section supplies what a checkpoint cannot "
                        "(DCM, DEM, CLIP heads, the compute dtype model.dtype): "
                        + config_help("tiny") + f"; default {DEFAULT_CONFIG} (:llava or "
                        ":llava_next for --llava-hf, as its model_type). Sizes found in the checkpoint win. Overrides follow it "
                        "as --config.model.dtype=float32")
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
  dst.add_argument("--lora-adapter", dest="lora_adapter", action="store_true",
                   help="params with LoRA factors (a LoRA run, a --keep-lora conversion): "
                        "write the PEFT layout the reference loads over its --model-base "
                        "(adapter_config.json, adapter_model.safetensors, "
                        "non_lora_trainables.bin with the DEM and projector, config.json) "
                        "instead of merged release weights")
  dst.add_argument("--base-model", dest="base_model", default=None, metavar="NAME",
                   help="with --lora-adapter: adapter_config.json's base_model_name_or_path "
                        "(default: the reference's LLM, Meta-Llama-3-8B-Instruct)")
  dst.add_argument("--quiet", action="store_true", help="no progress lines")

  low = commands.add_parser(
      "quantize", help="converted checkpoint -> one with the LLM's linear layers in 8 or 4 bits",
      description="Writes a converted checkpoint whose LLM linear kernels (attention q, k, v, "
                  "o; MLP gate, up, down) are weight-only quantised (int8: a scale per output "
                  "channel; 4-bit: per group of inputs), on the host's CPU, one kernel at a "
                  "time: the float model never reaches an accelerator. generate, chat, serve "
                  "and evaluate run the result in its mode.")
  low.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="converted checkpoint (DIR/params + DIR/model_config.json)")
  low.add_argument("--out", required=True, metavar="DIR", help="folder to write")
  low.add_argument("--bits", type=int, choices=(8, 4), required=True,
                   help="8: int8; 4: int4 (or NormalFloat4 with --nf4)")
  low.add_argument("--nf4", action="store_true", help="with --bits 4: NormalFloat4 codes")
  low.add_argument("--group-size", dest="group_size", type=int, default=128,
                   help="inputs per 4-bit scale (default %(default)s)")
  return parser


def check_paths(parser, **flags: str | None) -> None:
  """Exits via parser.error when a flag (its dest: value) names nothing."""
  for dest, path in flags.items():
    if path is not None and not os.path.exists(path):
      parser.error(f"--{dest.replace('_', '-')} {path!r} does not exist")


def _model_config(args, overrides: list[str]):
  """`model` of --config (or the default) with the overrides; None: `hf`'s default."""
  if not (args.config or overrides):
    return None
  from infllava_jax.convert import sources
  if args.config:
    spec = args.config
  elif args.llava_hf:
    spec = f"{DEFAULT_CONFIG}:{sources.llava_hf_variant(args.llava_hf)}"
  elif args.model_base and _model_type(args.model_base) in sources.LLAVA_HF_VARIANTS:
    spec = f"{DEFAULT_CONFIG}:{sources.llava_hf_variant(args.model_base)}"
  else:
    spec = f"{DEFAULT_CONFIG}:infllava"
  return load_config(spec, overrides).model


def _model_type(folder: str) -> str | None:
  """config.json's model_type of a checkpoint folder (None without one: the source says so)."""
  from infllava_jax.convert.readers import read_json
  path = os.path.join(folder, "config.json")
  return read_json(path).get("model_type") if os.path.isfile(path) else None


def _source(args, parser, overrides: list[str]):
  from infllava_jax.convert import sources
  from infllava_jax.lora import peft
  config = _model_config(args, overrides)
  given = [name for name in ("model", "llama", "llava_hf") if getattr(args, name)]
  if len(given) != 1:
    parser.error("give exactly one source: --model DIR, --llama DIR --clip DIR, or --llava-hf DIR")
  if args.model_base and not args.model:
    parser.error("--model-base goes with --model LORA_DIR")
  if args.keep_lora and not args.model_base:
    parser.error("--keep-lora goes with --model LORA_DIR --model-base BASE")
  if args.llama and not args.clip:
    parser.error("--llama needs --clip DIR")
  if args.clip and not (args.llama or args.model_base):
    parser.error("--clip goes with --llama or --model-base")
  if args.projector and not args.llama:
    parser.error("--projector goes with --llama")
  check_paths(parser, model=args.model, model_base=args.model_base, llama=args.llama,
              clip=args.clip, projector=args.projector, llava_hf=args.llava_hf)
  if args.model_base:
    return _base_source(args, parser, config)
  if args.model:
    if peft.has_adapter(args.model):
      raise ConfigError(f"--model {args.model!r} is a LoRA folder ({peft.CONFIG_FILE}): give "
                        "the model it was trained on with --model-base BASE")
    return sources.release_source(args.model, config)
  if args.llama:
    return sources.separate_source(args.llama, args.clip, args.projector, config, args.pad_row)
  return sources.llava_hf_source(args.llava_hf, config)


def _base_source(args, parser, config):
  """The --model-base folder as a source, by its config.json's model_type."""
  from infllava_jax.convert import sources
  model_type = _model_type(args.model_base)
  if model_type == "llama":
    if not args.clip:
      parser.error(f"--model-base {args.model_base!r} is a LLaMA folder: give its CLIP with "
                   "--clip DIR")
    return sources.separate_source(args.model_base, args.clip, None, config, args.pad_row)
  if args.clip:
    parser.error("--clip goes with a LLaMA --model-base (model_type 'llama')")
  if model_type == sources.LLAVA_HF_MODEL_TYPE:
    return sources.llava_hf_source(args.model_base, config)
  return sources.release_source(args.model_base, config)  # or its error: no config.json, ...


def dtypes_note(model_cfg) -> str:
  """What a converted checkpoint records: its compute dtype and its params' dtypes."""
  stored = sorted({model_cfg.llm.param_dtype, model_cfg.vision.param_dtype})
  return f"computes in {model_cfg.dtype} (model.dtype), params stored as {'/'.join(stored)}"


def from_pytorch(args, parser, overrides: list[str]) -> None:
  import jax.numpy as jnp
  from flax import traverse_util
  from infllava_jax.checkpoints import converted
  from infllava_jax.convert import adapter, plan, readers
  source = _source(args, parser, overrides)
  lora = adapter.read_adapter(args.model) if args.model_base else None
  progress = Progress(0, 0, args.quiet)
  reader = readers.Reader(on_read=lambda ref: progress(ref.stored_name, ref.nbytes))
  model_cfg, params = plan.plan(source, reader, dtype=args.dtype, seed=args.seed)
  if lora:
    params = adapter.apply_adapter(lora, source, model_cfg, params, reader, args.dtype,
                                   args.keep_lora)
  streamed = [leaf for leaf in traverse_util.flatten_dict(params).values()
              if isinstance(leaf, converted.StreamedArray)]
  progress.total_tensors = sum((leaf.shape[0] if leaf.stacked else 1) * leaf.sources
                               for leaf in streamed)
  progress.total_bytes = sum(leaf.nbytes for leaf in streamed)
  if not args.quiet:
    print(f"{source.label}: {model_cfg.variant} model, {progress.total_tensors} tensors "
          f"({progress.total_bytes / 1e9:.2f} GB) to convert"
          + (f"; initialising {', '.join(source.init)} (PyTorch's default init)"
             if source.init and not lora else ""))
  converted.save_converted(args.out, model_cfg, params)
  if lora and args.keep_lora:
    converted.save_lora(args.out, *adapter.kept_lora(lora))
  folder = args.model_base or args.model or args.llama or args.llava_hf
  tokenizer = converted.save_tokenizer(args.out, folder)
  if tokenizer is None:
    print(f"note: {folder} holds no tokenizer ({', '.join(converted.TOKENIZER_FILES)}): "
          "give generate, chat, serve and evaluate the model's tokenizer folder with "
          "--tokenizer DIR", file=sys.stderr)
  if jnp.dtype(model_cfg.dtype).itemsize < max(
      jnp.dtype(d).itemsize for d in (model_cfg.llm.param_dtype, model_cfg.vision.param_dtype)):
    print(f"note: {args.out} {dtypes_note(model_cfg)}: generate, chat, serve and evaluate "
          f"compute in {model_cfg.dtype} unless given --dtype float32 (or convert with "
          "--config.model.dtype=float32)", file=sys.stderr)
  if not args.quiet:
    print(f"wrote {args.out}: {dtypes_note(model_cfg)}"
          + (f"; LoRA {args.model} {'kept (lora.json)' if args.keep_lora else 'merged'}"
             if lora else "")
          + (f"; tokenizer copied from {folder}" if tokenizer else ""))


def to_pytorch(args, parser) -> None:
  from infllava_jax.convert import export
  check_paths(parser, checkpoint=args.checkpoint)
  progress = Progress(0, 0, args.quiet)
  def on_write(name, nbytes, total_tensors, total_bytes):
    progress.total_tensors, progress.total_bytes = total_tensors, total_bytes
    progress(name, nbytes)
  if args.base_model and not args.lora_adapter:
    parser.error("--base-model goes with --lora-adapter")
  export.export_release(args.checkpoint, args.out, dtype=args.dtype,
                        max_shard_bytes=int(args.max_shard_size * 1e9), on_write=on_write,
                        lora_adapter=args.lora_adapter,
                        base_model=args.base_model or export.BASE_MODEL)
  if not args.quiet:
    print(f"wrote {args.out}")


def quantize_checkpoint(args, parser) -> None:
  from infllava_jax import quantize
  from infllava_jax.checkpoints import converted
  check_paths(parser, checkpoint=args.checkpoint)
  if args.nf4 and args.bits != 4:
    parser.error("--nf4 goes with --bits 4")
  if not converted.is_converted(args.checkpoint):
    raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: not a converted checkpoint "
                            f"(no {converted.CONFIG_FILE}); a training run converts with "
                            "`infllava convert to-pytorch` + `from-pytorch` first")
  if os.path.exists(args.out) and os.listdir(args.out):
    raise FileExistsError(f"--out {args.out!r} is not empty")
  mode = "int8" if args.bits == 8 else "nf4" if args.nf4 else "int4"
  start = time.perf_counter()
  quantize.convert(args.checkpoint, args.out, mode, args.group_size)
  print(f"wrote {args.out} ({mode}) in {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  bad = [o for o in overrides if args.command != "from-pytorch" or not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)} (from-pytorch takes config "
                 "overrides such as --config.model.dtype=float32)")
  try:
    if args.command == "from-pytorch":
      from_pytorch(args, parser, overrides)
    elif args.command == "quantize":
      quantize_checkpoint(args, parser)
    else:
      to_pytorch(args, parser)
  except ConversionError as err:  # the checkpoint's contents: every problem, listed
    print(f"infllava convert {args.command}: error: {err}", file=sys.stderr)
    return 1
  except (FileNotFoundError, FileExistsError) as err:  # a folder given wrong, or --out taken
    return user_error(f"infllava convert {args.command}", err)
  return 0
