"""`infllava generate`: answer one question about one image with a checkpoint.

  infllava generate --checkpoint runs/synthetic --image cat.png --prompt "What is it?"

`--checkpoint` is a training run folder (its latest step, or `--step`) or a converted
checkpoint folder (`infllava convert from-pytorch --out DIR`). Decoding is greedy unless
`--temperature` is above 0. The image is read before the model loads. A file Pillow
cannot read, or a prompt that with `--max-new-tokens` is over the model's positions, is
one line on stderr (the prompt not echoed) and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from infllava_jax import generate, quantize
from infllava_jax.cli import user_error
from infllava_jax.convert.cli import DTYPES
from infllava_jax.data import images
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.inference import Assistant


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
  """--checkpoint, --step, --tokenizer, --dtype and --quantize: what the inference commands
  load, and how."""
  parser.add_argument("--checkpoint", required=True, help="run folder or converted checkpoint")
  parser.add_argument("--step", type=int, default=None, help="step of a run (default: latest)")
  parser.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="the model's Hugging Face tokenizer folder (default: the "
                           "checkpoint's: a run's data.tokenizer_path, a converted "
                           "checkpoint's DIR/tokenizer, else the package's small one)")
  parser.add_argument("--dtype", choices=DTYPES, default=None,
                      help="compute dtype (default: the checkpoint's model.dtype, which "
                           "the load line names; float32 runs a float32 checkpoint as "
                           "stored, bfloat16 halves the LLM's float32 params on load)")
  parser.add_argument("--quantize", choices=quantize.MODES, default=None,
                      help="run the LLM's linear layers on weight-only quantised weights "
                           "(int8: one scale per output channel; int4 / nf4: per group of 128 "
                           "inputs). A checkpoint written by `infllava convert quantize` runs "
                           "in its own mode without this flag")


def check_checkpoint_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits via parser.error when --checkpoint or --tokenizer names nothing."""
  for flag, path in (("--checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer)):
    if path is not None and not os.path.exists(path):
      parser.error(f"{flag} {path!r} does not exist")


def flag_image(parser: argparse.ArgumentParser, path: str):
  """The --image file decoded (a PIL image), before any model loads; exits via parser.error
  when it is missing or not an image Pillow reads."""
  try:
    return images.decode(path)
  except images.ImageError as e:
    parser.error(f"--image: {e}")


def flag_tokenizer(args: argparse.Namespace):
  """The tokenizer --tokenizer names, or None (the Assistant then takes the checkpoint's)."""
  return load_tokenizer(args.tokenizer) if args.tokenizer else None


def loaded_line(args: argparse.Namespace, assistant: Assistant, seconds: float) -> str:
  """`loaded CHECKPOINT (variant, compute dtype) in Ns`."""
  model = assistant.config.model
  mode = quantize.params_mode(assistant.params)
  return (f"loaded {args.checkpoint} ({model.variant}, {model.dtype}"
          f"{', ' + mode if mode else ''}) in {seconds:.1f}s")


def load_assistant(prog: str, args: argparse.Namespace, suffix: str = "",
                   **kwargs) -> Assistant | None:
  """`Assistant.from_run` on the flags of `add_checkpoint_flags` (kwargs: the constructor's),
  its load time and compute dtype on stderr (then `suffix`); None, after saying why, for a
  tokenizer that is not the model's."""
  start = time.perf_counter()
  try:
    assistant = Assistant.from_run(args.checkpoint, args.step, dtype=args.dtype,
                                   tokenizer=flag_tokenizer(args), quantize=args.quantize,
                                   **kwargs)
  except ValueError as e:
    user_error(prog, e)
    return None
  # Prompts are bounded by the model's positions, which the Assistant checks (one line);
  # the tokenizer's own model_max_length would only add transformers' warning about it.
  assistant.tokenizer.model_max_length = sys.maxsize
  print(loaded_line(args, assistant, time.perf_counter() - start) + suffix, file=sys.stderr)
  return assistant


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int,
                       temperature: float) -> None:
  """--max-new-tokens, --temperature, --top-p, --top-k and --seed, with these defaults."""
  parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                      help="most tokens per answer (default: %(default)s)")
  parser.add_argument("--temperature", type=float, default=temperature,
                      help="0: greedy (default: %(default)s)")
  parser.add_argument("--top-p", type=float, default=1.0,
                      help="nucleus cut in (0, 1]; 1: none (default: %(default)s)")
  parser.add_argument("--top-k", type=int, default=0,
                      help="keep the k most likely tokens; 0: no cut (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="sampling seed (default: %(default)s)")


def sampling_from_flags(parser: argparse.ArgumentParser,
                        args: argparse.Namespace) -> generate.Sampling:
  """The Sampling of `add_sampling_flags`' flags; out-of-range values exit via parser.error."""
  try:
    return generate.Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k)
  except ValueError as e:
    parser.error(str(e))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_flags(parser)
  parser.add_argument("--image", required=True, help="image file (any format Pillow reads)")
  parser.add_argument("--prompt", required=True, help="the question")
  add_sampling_flags(parser, max_new_tokens=64, temperature=0.0)
  args = parser.parse_args(argv)
  check_checkpoint_flags(parser, args)
  image = flag_image(parser, args.image)
  sampling = sampling_from_flags(parser, args)

  assistant = load_assistant("infllava generate", args)
  if assistant is None:
    return 2
  try:  # the answer first: a refused prompt is not echoed (it may be pages long)
    answer = assistant.ask(image, args.prompt, sampling=sampling, seed=args.seed)
  except ValueError as e:  # the prompt: too long with --max-new-tokens, or '<image>' in it
    return user_error("infllava generate", e)
  print(f"Q: {args.prompt}")
  print(f"A: {answer}")
  return 0
