"""`infllava <command> ...`: one entry point, each command in its own module.

Each command module exposes `main(argv: list[str]) -> int`; modules are imported only when
their command runs, so `infllava --help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

# command -> (module, one-line description)
COMMANDS = {
    "demo": ("infllava_jax.demo", "build a model from a config and run one image+text forward"),
    "train": ("infllava_jax.training.cli", "train a model from a config (multi-host aware; resumes)"),
    "compile": ("infllava_jax.compile_cli", "ahead-of-time compile a train step or (--inference) generation: per-device memory"),
    "generate": ("infllava_jax.generate_cli", "answer a question about an image with a checkpoint"),
    "chat": ("infllava_jax.chat", "multi-turn chat about an image in the terminal (streamed)"),
    "evaluate": ("infllava_jax.evaluate.cli", "accuracy on ScienceQA, POPE, MMBench, SEED-Bench or the synthetic set"),
    "serve": ("infllava_jax.serve", "OpenAI-compatible /v1/chat/completions endpoint (loopback)"),
    "web": ("infllava_jax.web", "browser chat about an image, its crops beside it (Gradio; loopback)"),
    "data": ("infllava_jax.data.cli", "write the synthetic dataset; pack LLaVA JSON + images into ArrayRecord shards"),
    "convert": ("infllava_jax.convert.cli", "PyTorch checkpoints (INF-LLaVA, HF LLaMA-3 + CLIP, llava-hf) <-> Orbax"),
    "inspect": ("infllava_jax.convert.inspect", "list the tensors, shapes, dtypes and counts of a checkpoint"),
}

USAGE = """usage: infllava [--verbose] <command> [options]   (or: infllava --version)

commands:
{commands}

Run `infllava <command> --help` for a command's options. A mistake in the input (a flag,
a path, a config override, a file's contents) is reported in one line and exits with 2;
`--verbose` (or INFLLAVA_VERBOSE=1) adds the traceback."""

VERBOSE_ENV = "INFLLAVA_VERBOSE"


def _describe() -> str:
  return "\n".join(f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items())


def verbose() -> bool:
  """Whether errors come with their traceback (`--verbose` or INFLLAVA_VERBOSE=1)."""
  return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def user_error(prog: str, error: BaseException) -> int:
  """Reports a user's mistake as one line `PROG: error: ...` on stderr (the traceback
  before it when `verbose()`); the exit status 2."""
  if verbose():
    traceback.print_exception(error, file=sys.stderr)
  print(f"{prog}: error: {error}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--verbose" in argv:  # before or after the command: it reaches the command's own errors
    argv = [a for a in argv if a != "--verbose"]
    os.environ[VERBOSE_ENV] = "1"
  if len(argv) == 2 and argv[0] == "help":  # `infllava help train` = `infllava train --help`
    argv = [argv[1], "--help"]
  if argv[:1] == ["--version"]:
    from importlib.metadata import version
    print(f"infllava-jax {version('infllava-jax')}")
    return 0
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE.format(commands=_describe()))
    return 0
  name, rest = argv[0], argv[1:]
  # We use transformers for tokenizers only; without torch (the plain install) it would
  # advise on import that "PyTorch was not found. Models won't be available", which reads
  # like a fault in our output. Its other warnings stay; a user's own setting wins.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if name not in COMMANDS:
    print(f"infllava: unknown command {name!r}\n\n" + USAGE.format(commands=_describe()),
          file=sys.stderr)
    return 2
  command = importlib.import_module(COMMANDS[name][0])
  from infllava_jax.errors import ConfigError
  try:
    return command.main(rest) or 0
  except (ConfigError, FileNotFoundError) as e:  # a mistyped override, config or path
    return user_error(f"infllava {name}", e)


if __name__ == "__main__":
  sys.exit(main())
