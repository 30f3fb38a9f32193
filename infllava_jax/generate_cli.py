"""`infllava generate`: answer one question about one image with a checkpoint.

  infllava generate --checkpoint runs/synthetic --image cat.png --prompt "What is it?"

`--checkpoint` is a training run folder (its latest step, or `--step`) or a converted
checkpoint folder (`infllava convert from-pytorch --out DIR`). Decoding is greedy unless
`--temperature` is above 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from infllava_jax import generate
from infllava_jax.inference import Assistant


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="run folder or converted checkpoint")
  parser.add_argument("--step", type=int, default=None, help="step of a run (default: latest)")
  parser.add_argument("--image", required=True, help="image file (any format Pillow reads)")
  parser.add_argument("--prompt", required=True, help="the question")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for flag, path in (("--checkpoint", args.checkpoint), ("--image", args.image)):
    if not os.path.exists(path):
      parser.error(f"{flag} {path!r} does not exist")
  try:
    sampling = generate.Sampling(max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k)
  except ValueError as e:
    parser.error(str(e))

  start = time.perf_counter()
  assistant = Assistant.from_run(args.checkpoint, args.step)
  print(f"loaded {args.checkpoint} ({assistant.config.model.variant}) in "
        f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
  print(f"Q: {args.prompt}")
  try:
    answer = assistant.ask(args.image, args.prompt, sampling=sampling, seed=args.seed)
  except ValueError as e:  # the prompt: too long with --max-new-tokens, or '<image>' in it
    print(f"infllava generate: error: {e}", file=sys.stderr)
    return 2
  print(f"A: {answer}")
  return 0
