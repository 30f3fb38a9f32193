"""ScienceQA (SQA-img): the image questions of the test split, in the release's file layout.

  ROOT/problems.json    {pid: {"question", "choices": [...], "answer": int, "hint",
                               "image": "image.png" | null, "split", "subject", ...}}
  ROOT/pid_splits.json  {"test": [pid, ...], "train": [...], ...}
  ROOT/images/test/PID/image.png   (or ROOT/test/PID/image.png, or IMAGES/PID/image.png)

The prompt is lmms-eval's / LLaVA's: "Context: HINT\\n" (when there is a hint), the
question, one "A. choice" line per choice, then the letter instruction. Categories are the
subjects (natural, social, language science).
"""

from __future__ import annotations

import os
from typing import Sequence

from infllava_jax.evaluate.records import (BenchmarkError, Question, choice_prompt, field,
                                           find_image, lettered, read_json, where)

PROBLEMS = "problems.json"
SPLITS = "pid_splits.json"


def image_folders(root: str, split: str, images: str | None) -> list[str]:
  """Where PID/image.png may be: --images if given, else ROOT/images/SPLIT and ROOT/SPLIT."""
  if images:
    return [images]
  return [os.path.join(root, "images", split), os.path.join(root, split)]


def read(data: str, images: str | None = None, split: str = "test") -> list[Question]:
  """The image questions of `split` (`data`: the folder with problems.json, or that file)."""
  root = os.path.dirname(data) if os.path.isfile(data) else data
  problems_path = data if os.path.isfile(data) else os.path.join(root, PROBLEMS)
  splits_path = os.path.join(root, SPLITS)
  problems = read_json(problems_path)
  splits = read_json(splits_path)
  if not isinstance(problems, dict):
    raise BenchmarkError(f"{problems_path}: expected an object of pid -> problem")
  if not isinstance(splits, dict) or split not in splits:
    raise BenchmarkError(f"{splits_path}: no {split!r} split")
  folders = image_folders(root, split, images)
  out = []
  for pid in splits[split]:
    pid = str(pid)
    if pid not in problems:
      raise BenchmarkError(f"{splits_path}: split {split!r} lists problem {pid}, which "
                           f"{problems_path} does not have")
    problem = problems[pid]
    image = field(problem, "image", problems_path, pid)
    if not image:
      continue  # a text-only problem: not part of SQA-img
    out.append(question(pid, problem, problems_path, folders))
  return out


def question(pid: str, problem: dict, source: str, folders: Sequence[str]) -> Question:
  """One problem (with an image) -> Question."""
  choices = field(problem, "choices", source, pid)
  answer = field(problem, "answer", source, pid)
  if not isinstance(choices, list) or len(choices) < 2:
    raise BenchmarkError(f"{where(source, pid)}: field 'choices': expected a list of at least "
                         f"2 choices, got {choices!r}")
  if not isinstance(answer, int) or not 0 <= answer < len(choices):
    raise BenchmarkError(f"{where(source, pid)}: field 'answer': expected a choice index in "
                         f"[0, {len(choices)}), got {answer!r}")
  hint = (problem.get("hint") or "").strip()
  context = f"Context: {hint}\n" if hint else ""
  path = find_image(os.path.join(pid, str(problem["image"])), folders, source, pid)
  options = lettered([str(c) for c in choices])
  prompt = choice_prompt(field(problem, "question", source, pid), list(options.values()), context)
  return Question(id=pid, image=path, prompt=prompt, answer=list(options)[answer],
                  category=str(field(problem, "subject", source, pid)), options=options,
                  source=source)
