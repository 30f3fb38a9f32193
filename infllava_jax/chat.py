"""`infllava chat`: a conversation about one image in the terminal, answers streamed.

  infllava chat --checkpoint runs/synthetic --image cat.png
  you> What is in the picture?
  assistant> A cat on a sofa.
  you> What colour is it?
  assistant> ...

Answers are printed piece by piece as their tokens are generated. Earlier questions and
answers go into each new prompt; the image belongs to the first question, as in training.
Commands:
  /reset        start a new conversation about the same image
  /image PATH   switch to another image (starts a new conversation)
  /help         this list
  /quit         leave (so does the end of input, Ctrl-D)

`--checkpoint` is a training run folder (its latest step, or `--step`) or a converted
checkpoint folder. Sampling uses temperature 0.2 by default, as the reference LLaVA CLI
(`llava/serve/cli.py`) does; `--temperature 0` is greedy. Turn k (0, 1, ...) of a
conversation samples with seed `--seed` + k, so a replayed conversation repeats itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from infllava_jax import generate
from infllava_jax.data import images
from infllava_jax.generate_cli import (add_checkpoint_flags, add_sampling_flags,
                                       check_checkpoint_flags, flag_image, load_assistant,
                                       sampling_from_flags)
from infllava_jax.inference import Answer, Assistant, ContextLengthError

HELP = """commands: /reset (new conversation), /image PATH (switch image, new conversation),
/help, /quit (or Ctrl-D)"""


class ChatSession:
  """One conversation: an image, the (question, answer) turns so far, how to sample."""

  def __init__(self, assistant: Assistant, image: Any, sampling: generate.Sampling,
               seed: int = 0):
    self.assistant, self.image, self.sampling, self.seed = assistant, image, sampling, seed
    self.history: list[tuple[str, str]] = []

  def reset(self) -> None:
    self.history = []

  def set_image(self, image: Any) -> None:
    """Switches to `image` (anything `data.images.decode` reads) and resets."""
    self.image = images.decode(image)
    self.reset()

  def ask(self, question: str, out: TextIO) -> Answer:
    """Answers `question`, writing the answer to `out` as it is generated; keeps the turn.

    Raises ValueError (`Assistant.generate_batch`) when the question cannot be asked: prompt
    + `max_new_tokens` over the model's positions, or the image marker in the text.
    """
    def write(piece: str) -> None:
      out.write(piece)
      out.flush()

    answer = self.assistant.stream(self.image, question, write, history=self.history,
                                   sampling=self.sampling, seed=self.seed + len(self.history))
    self.history.append((question, answer.text))
    return answer


def run(session: ChatSession, lines: TextIO, out: TextIO) -> None:
  """The read-answer loop: `lines` until /quit or their end."""
  while True:
    out.write("you> ")
    out.flush()
    line = lines.readline()
    if not line:  # end of input
      out.write("\n")
      return
    line = line.strip()
    if not line:
      continue
    command, _, arg = line.partition(" ")
    if command in ("/quit", "/exit"):
      return
    if command == "/reset":
      session.reset()
      out.write("(new conversation)\n")
    elif command == "/image":
      try:
        session.set_image(arg.strip())
        out.write(f"(image {arg.strip()}; new conversation)\n")
      except images.ImageError as e:
        out.write(f"(cannot use that image: {e})\n")
    elif command in ("/help", "/?"):
      out.write(HELP + "\n")
    elif command.startswith("/") and command[1:].isalpha():
      out.write(f"(unknown command {command}; /help lists them)\n")
    else:
      out.write("assistant> ")
      out.flush()
      try:
        session.ask(line, out)
      except ValueError as e:  # the image marker in the text, or too long a conversation
        hint = ("; /reset starts a new conversation"
                if isinstance(e, ContextLengthError) and session.history else "")
        out.write(f"(cannot answer: {e}{hint})")
      out.write("\n")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava chat", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_flags(parser)
  parser.add_argument("--image", required=True, help="image file (any format Pillow reads)")
  add_sampling_flags(parser, max_new_tokens=512, temperature=0.2)
  parser.add_argument("--length-bucket", type=int, default=64,
                      help="pad prompts to a multiple of this many tokens, fewer compiles "
                           "(default: %(default)s)")
  args = parser.parse_args(argv)
  check_checkpoint_flags(parser, args)
  if args.length_bucket < 1:
    parser.error("--length-bucket must be >= 1")
  sampling = sampling_from_flags(parser, args)
  image = flag_image(parser, args.image)

  assistant = load_assistant("infllava chat", args, f". {HELP}",
                             length_bucket=args.length_bucket)
  if assistant is None:
    return 2
  try:
    run(ChatSession(assistant, image, sampling, args.seed), sys.stdin, sys.stdout)
  except KeyboardInterrupt:
    print(file=sys.stdout)
  return 0
