"""`infllava evaluate`: accuracy of a checkpoint on a benchmark's local files.

  infllava evaluate --checkpoint runs/synthetic --benchmark scienceqa --data ScienceQA/
  infllava evaluate --checkpoint ckpt/ --benchmark pope --data pope/ --images coco/val2014
  infllava evaluate --checkpoint ckpt/ --benchmark mmbench --data MMBench_DEV_EN.tsv
  infllava evaluate --checkpoint ckpt/ --benchmark seed --data SEED-Bench.json \\
      --images SEED-Bench-image/
  infllava evaluate --checkpoint runs/synthetic --benchmark synthetic --limit 256
  infllava evaluate --checkpoint ckpt/ --lmms mmmu_val,pope,scienceqa_img   # lmms-eval tasks

--data per benchmark: scienceqa, the folder with problems.json and pid_splits.json
(images in DATA/images/test/PID/ or DATA/test/PID/, or --images); pope, a
coco_pope_<category>.json file or a folder of them (images: --images, the COCO val2014
folder); mmbench, the TSV (base64 images inside; CircularEval unless --no-circular);
seed, SEED-Bench.json (images: --images, else SEED-Bench-image/ beside it); synthetic,
nothing (the run's held-out split).

Decoding is greedy, as in the paper's evaluation. Writes OUT/predictions.jsonl (one line
per question asked: output, parsed answer, right or not) and OUT/summary.json (accuracy
overall and per category; POPE adds precision/recall/F1/yes-ratio, MMBench the vanilla
first-pass numbers beside the circular ones; the compute dtype, see --dtype), and prints the summary. An OUT that holds
an earlier run's files is refused before the model loads, unless --overwrite.

--lmms TASKS runs lmms-eval's tasks (comma-separated names, the [lmms] extra; README's
table maps the paper's columns to them) with this model in-process, through lmms-eval's
own prompts and scoring (`infllava_jax.evaluate.lmms`; its datasets come from the Hugging
Face hub, or --lmms-include's task YAMLs). Writes OUT/lmms_results.json (each task's
metrics) and OUT/lmms_samples.jsonl (one line per question: task, doc_id, target, output,
metrics) and prints lmms-eval's table. --max-new-tokens is then the length for tasks that
set none (default 128).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from infllava_jax import generate, quantize
from infllava_jax.evaluate import mmbench, pope, records, runner, scienceqa, scoring, seed
from infllava_jax.evaluate import synthetic
from infllava_jax.cli import user_error
from infllava_jax.errors import ConfigError
from infllava_jax.generate_cli import (add_checkpoint_flags, check_checkpoint_flags,
                                       flag_tokenizer, loaded_line)
from infllava_jax.inference import Assistant, load_checkpoint
from infllava_jax.model import infllava

BENCHMARKS = ("scienceqa", "pope", "mmbench", "seed", "synthetic")
MAX_NEW_TOKENS = 16  # enough for a letter, yes/no or a short phrase and its stop token
OUTPUTS = ("predictions.jsonl", "summary.json")  # what a run writes into --out
LMMS_OUTPUTS = ("lmms_results.json", "lmms_samples.jsonl")  # ... and a --lmms run


def read_questions(args: argparse.Namespace, config=None) -> list[records.Question]:
  """The benchmark's questions, the first --limit of them (MMBench: of its questions, each
  with all its shifts). `config` (the checkpoint's) is needed for synthetic only."""
  if args.benchmark == "synthetic":
    num = args.limit or synthetic.synthetic_config(config).num_heldout
    return synthetic.questions(config, num)
  if args.benchmark == "scienceqa":
    questions = scienceqa.read(args.data, args.images)
  elif args.benchmark == "pope":
    questions = pope.read(args.data, args.images)
  elif args.benchmark == "mmbench":
    questions = mmbench.read(args.data, circular=args.circular)
  else:
    questions = seed.read(args.data, args.images)
  return records.limit(questions, args.limit)


def default_out(checkpoint: str, benchmark: str) -> str:
  """CHECKPOINT_eval/BENCHMARK beside the checkpoint folder."""
  return os.path.join(os.path.normpath(checkpoint) + "_eval", benchmark)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="infllava evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_flags(parser)
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--benchmark", choices=BENCHMARKS,
                     help="which benchmark's files --data holds (see above)")
  which.add_argument("--lmms", metavar="TASKS", default=None,
                     help="lmms-eval task names, comma-separated (see above)")
  parser.add_argument("--lmms-include", metavar="DIR", default=None,
                      help="--lmms: a folder of extra lmms-eval task YAMLs")
  parser.add_argument("--multi-image", choices=("error", "first"), default=None,
                      help="--lmms: a question with several images (MMMU's few, SEED-Bench's "
                           "video frames) stops the run (error, the default) or is asked "
                           "about its first image (first)")
  parser.add_argument("--data", default=None,
                      help="the benchmark's question file or folder (not for synthetic)")
  parser.add_argument("--images", default=None, help="image folder (see above)")
  parser.add_argument("--out", default=None,
                      help="output folder (default: CHECKPOINT_eval/BENCHMARK, or "
                           "CHECKPOINT_eval/lmms)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the predictions and summary an earlier run left in OUT "
                           "(default: refuse to)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="questions per generate call (default: %(default)s)")
  parser.add_argument("--limit", type=int, default=None,
                      help="only the first N questions (default: all; synthetic: the run's "
                           "data.synthetic.num_heldout, of which `infllava train` scores the "
                           "first eval.heldout_examples; MMBench: N questions, all shifts)")
  parser.add_argument("--max-new-tokens", type=int, default=None,
                      help=f"default: {MAX_NEW_TOKENS} (synthetic: the run's "
                           "eval.max_new_tokens, else 8)")
  parser.add_argument("--no-circular", dest="circular", action="store_false",
                      help="MMBench: ask each question once (vanilla only)")
  parser.add_argument("--length-bucket", type=int, default=64,
                      help="pad prompts to a multiple of this many tokens, so batches of "
                           "nearby prompt lengths share one compiled generation (default: "
                           "%(default)s)")
  parser.add_argument("--processor-size", type=int, default=None,
                      help="preprocess images to this side, then let the model resize them "
                           "bicubically to its input side: 336 is the released INF-LLaVA "
                           "repository's inference path (its CLIP processor); default: the "
                           "model's input side, as in training")
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar (for logs)")
  args = parser.parse_args(argv)
  check_checkpoint_flags(parser, args)
  if args.lmms is not None:
    return lmms_args(parser, args)
  if args.lmms_include or args.multi_image:
    parser.error("--lmms-include and --multi-image go with --lmms")
  if args.benchmark == "synthetic" and (args.data or args.images):
    parser.error("--benchmark synthetic takes no --data or --images: its held-out split is "
                 "generated from the run's config")
  if args.benchmark != "synthetic":
    if not args.data:
      parser.error(f"--data is required for --benchmark {args.benchmark}")
    if not os.path.exists(args.data):
      parser.error(f"--data {args.data!r} does not exist")
  if args.images and not os.path.isdir(args.images):
    parser.error(f"--images {args.images!r} is not a folder")
  for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                      ("--max-new-tokens", args.max_new_tokens),
                      ("--length-bucket", args.length_bucket),
                      ("--processor-size", args.processor_size)):
    if value is not None and value < 1:
      parser.error(f"{flag} must be at least 1, got {value}")
  args.out = args.out or default_out(args.checkpoint, args.benchmark)
  check_out(parser, args, OUTPUTS)
  return args


def check_out(parser: argparse.ArgumentParser, args: argparse.Namespace,
              outputs: tuple[str, ...]) -> None:
  """Refuses an --out holding an earlier run's `outputs`, unless --overwrite."""
  earlier = [name for name in outputs if os.path.exists(os.path.join(args.out, name))]
  if earlier and not args.overwrite:
    parser.error(f"--out {args.out!r} already holds {' and '.join(earlier)} from an earlier "
                 "run; give another --out, or --overwrite to replace them")


def lmms_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
  """parse_args' checks for a --lmms run."""
  args.tasks = [t.strip() for t in args.lmms.split(",") if t.strip()]
  if not args.tasks:
    parser.error(f"--lmms {args.lmms!r}: expected task names, comma-separated")
  for flag in ("data", "images", "processor_size"):
    if getattr(args, flag):
      parser.error(f"--{flag.replace('_', '-')} does not go with --lmms: lmms-eval's tasks "
                   "read their own data")
  if args.lmms_include and not os.path.isdir(args.lmms_include):
    parser.error(f"--lmms-include {args.lmms_include!r} is not a folder")
  for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                      ("--max-new-tokens", args.max_new_tokens),
                      ("--length-bucket", args.length_bucket)):
    if value is not None and value < 1:
      parser.error(f"{flag} must be at least 1, got {value}")
  args.out = args.out or default_out(args.checkpoint, "lmms")
  check_out(parser, args, LMMS_OUTPUTS)
  return args


def run_lmms(args: argparse.Namespace) -> int:
  """`--lmms`: lmms-eval's tasks with the checkpoint's Assistant; writes LMMS_OUTPUTS."""
  try:
    import lmms_eval.evaluator  # noqa: F401  (and the dependencies it imports)
    import filelock._api  # noqa: F401  lmms-eval 0.7.3 patches it: filelock < 4 ([lmms])
  except ImportError as e:
    return user_error("infllava evaluate", ConfigError(
        f"--lmms needs lmms-eval ({e}); install it as README's lmms-eval section says"))
  from infllava_jax.evaluate import lmms
  manager = lmms.task_manager(args.tasks, args.lmms_include)  # before the model loads
  start = time.perf_counter()
  config, params, step = load_checkpoint(args.checkpoint, args.step, args.dtype)
  try:
    assistant = Assistant(config, params, tokenizer=flag_tokenizer(args),
                          length_bucket=args.length_bucket, consume_params=True,
                          quantize=args.quantize)
  except ValueError as e:
    return user_error("infllava evaluate", e)
  del params
  print(loaded_line(args, assistant, time.perf_counter() - start), file=sys.stderr)
  results = lmms.evaluate(assistant, args.tasks, args.batch_size, args.limit,
                          args.lmms_include,
                          args.max_new_tokens or lmms.DEFAULT_MAX_NEW_TOKENS,
                          args.multi_image or "error", args.progress, manager)
  os.makedirs(args.out, exist_ok=True)
  run = {"checkpoint": os.path.abspath(args.checkpoint), "step": step,
         "dtype": assistant.config.model.dtype,
         "quantize": quantize.params_mode(assistant.params), "batch_size": args.batch_size,
         "seconds": round(time.perf_counter() - start, 1)}
  lmms.write(results, os.path.join(args.out, LMMS_OUTPUTS[0]),
             os.path.join(args.out, LMMS_OUTPUTS[1]), run)
  print(lmms.table(results))
  return 0


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  if args.lmms is not None:
    return run_lmms(args)
  start = time.perf_counter()
  try:  # the benchmark's files first: a bad record stops the run before the model loads
    questions = None if args.benchmark == "synthetic" else read_questions(args)
    config, params, step = load_checkpoint(args.checkpoint, args.step, args.dtype)
    if args.processor_size:
      config.model.dcm.processor_size = args.processor_size
      try:
        infllava.input_size(config.model)
      except ValueError as e:  # the llava baseline, which has no resize
        print(f"infllava evaluate: --processor-size: {e}", file=sys.stderr)
        return 2
    try:
      assistant = Assistant(config, params, tokenizer=flag_tokenizer(args),
                            length_bucket=args.length_bucket, consume_params=True,
                            quantize=args.quantize)
    except ValueError as e:  # a tokenizer that is not the model's
      return user_error("infllava evaluate", e)
    del params  # handed over: the Assistant holds them with the layers unrolled
    print(loaded_line(args, assistant, time.perf_counter() - start), file=sys.stderr)
    if questions is None:
      questions = read_questions(args, assistant.config)
  except records.BenchmarkError as e:
    print(f"infllava evaluate: {e}", file=sys.stderr)
    return 1
  if not questions:
    print(f"infllava evaluate: no {args.benchmark} questions in {args.data}", file=sys.stderr)
    return 1
  tokens = args.max_new_tokens or (synthetic.max_new_tokens(assistant.config)
                                   if args.benchmark == "synthetic" else MAX_NEW_TOKENS)
  out = args.out
  os.makedirs(out, exist_ok=True)
  print(f"{len(questions)} {args.benchmark} questions, batch size {args.batch_size}, "
        f"writing {out}", file=sys.stderr)
  try:
    rows = runner.run(assistant, questions, generate.Sampling(max_new_tokens=tokens),
                      args.batch_size, os.path.join(out, "predictions.jsonl"), args.progress)
  except records.BenchmarkError as e:
    print(f"infllava evaluate: {e}", file=sys.stderr)
    return 1
  summary = scoring.summarize(args.benchmark, rows)
  summary.update(checkpoint=os.path.abspath(args.checkpoint),
                 step=step,
                 data=args.data and os.path.abspath(args.data), max_new_tokens=tokens,
                 dtype=assistant.config.model.dtype,
                 quantize=quantize.params_mode(assistant.params),
                 processor_size=infllava.input_size(assistant.config.model),
                 seconds=round(time.perf_counter() - start, 1))
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
  print(json.dumps(summary, indent=2, ensure_ascii=False))
  return 0
