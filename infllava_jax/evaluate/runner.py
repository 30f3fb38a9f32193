"""Asks an `Assistant` every question of a benchmark, in fixed-size batches, and scores it.

    rows = run(assistant, questions, sampling, batch_size=8, predictions="out/predictions.jsonl")
    summary = scoring.summarize("pope", rows)

Every batch has `batch_size` rows (the last one padded with copies of its last question,
whose answers are dropped), so the batch dimension never changes the compiled program.
Predictions are written one JSON line per question as batches finish, so an interrupted
run keeps what it answered. A tqdm progress bar goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from tqdm import tqdm

from infllava_jax import generate
from infllava_jax.data import images
from infllava_jax.evaluate import scoring
from infllava_jax.evaluate.records import BenchmarkError, Question
from infllava_jax.inference import Assistant

Row = tuple[Question, str, "str | None", bool]  # (question, output text, parsed, right)


def load_image(question: Question):
  """The question's image as an RGB PIL image, or an error naming the record."""
  try:
    return images.decode(question.image)
  except images.ImageError as e:
    raise BenchmarkError(f"{question.source or 'benchmark'}: record {question.id}: field "
                         f"'image': {e}") from e


def prediction(question: Question, output: str, parsed: str | None, right: bool) -> dict:
  """One line of predictions.jsonl."""
  line = {"id": question.id, "category": question.category, "prompt": question.prompt,
          "answer": question.answer, "output": output, "parsed": parsed, "correct": right}
  if question.group:
    line.update(group=question.group, shift=question.shift)
  return line


def run(assistant: Assistant, questions: Sequence[Question], sampling: generate.Sampling,
        batch_size: int = 8, predictions: str | None = None, progress: bool = True) -> list[Row]:
  """Greedy answers to every question, scored; each also written to `predictions` (jsonl)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  rows: list[Row] = []
  out = None
  if predictions:
    os.makedirs(os.path.dirname(os.path.abspath(predictions)), exist_ok=True)
    out = open(predictions, "w", encoding="utf-8")
  bar = tqdm(total=len(questions), file=sys.stderr, unit="q", disable=not progress,
             dynamic_ncols=True)
  try:
    for lo in range(0, len(questions), batch_size):
      chunk = list(questions[lo:lo + batch_size])
      pad = batch_size - len(chunk)
      pictures = [load_image(q) for q in chunk]
      outputs = assistant.ask_batch(pictures + pictures[-1:] * pad,
                                    [q.prompt for q in chunk + chunk[-1:] * pad], sampling)
      for question, output in zip(chunk, outputs):
        parsed, right = scoring.score(question, output)
        rows.append((question, output, parsed, right))
        if out:
          out.write(json.dumps(prediction(question, output, parsed, right),
                               ensure_ascii=False) + "\n")
      if out:
        out.flush()
      bar.set_postfix(accuracy=f"{sum(r[3] for r in rows) / len(rows):.3f}", refresh=False)
      bar.update(len(chunk))
  finally:
    bar.close()
    if out:
      out.close()
  return rows
