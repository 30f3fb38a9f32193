"""MMBench: a TSV of multiple-choice questions with base64 images, scored with CircularEval.

Columns (OpenCompass / VLMEvalKit / LLaVA release): index, question, hint, A, B, C, D (a
question may have fewer options: the later cells are empty or "nan"), answer, category,
l2-category, image (base64 PNG/JPEG), split, source. The options end at the first empty one.

CircularEval asks each question once per circular shift of its options: shift k shows the
option texts t_k, t_{k+1}, ... under the letters A, B, ...; the answer letter moves with
its text. A question counts as right only when every shift is right. Shift k of question
i has the id i + k * 1000000, VLMEvalKit's numbering. Files that already hold the shifted
copies (VLMEvalKit's MMBench_DEV_EN.tsv: rows with index >= 1000000, whose image cell may
name the index of the row with the picture) are used as they are.

Prompt (LLaVA's model_vqa_mmbench): "HINT\\n" when there is a hint, the question, the
"A. option" lines, the letter instruction.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys

from infllava_jax.evaluate.records import (LETTERS, BenchmarkError, Question, choice_prompt,
                                           is_blank, where)

SHIFT = 1_000_000  # VLMEvalKit: index of shift k = index + k * SHIFT
REQUIRED = ("index", "question", "A", "B", "answer", "category", "image")


def read_rows(path: str) -> list[dict]:
  """The TSV's rows as dicts (header checked for the columns MMBench needs)."""
  if not os.path.isfile(path):
    raise BenchmarkError(f"{path}: file not found")
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 KiB default
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
      raise BenchmarkError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
    return list(reader)


def cell(row: dict, column: str) -> str:
  """A cell's text, stripped ('' for a cell a short row lacks)."""
  return (row.get(column) or "").strip()


def options_of(row: dict) -> list[str]:
  """The option texts, in letter order, up to the first empty cell."""
  options = []
  for letter in LETTERS:
    if letter not in row or is_blank(row[letter]):
      break
    options.append(cell(row, letter))
  return options


def image_bytes(row: dict, by_index: dict[int, dict], source: str, index: int) -> bytes:
  """The row's decoded image; a short all-digit cell names the row holding the image."""
  text = cell(row, "image")
  if text.isdigit() and len(text) <= 64:
    if int(text) not in by_index:
      raise BenchmarkError(f"{where(source, index)}: field 'image': refers to row {text}, "
                           "which the file does not have")
    text = cell(by_index[int(text)], "image")
  if is_blank(text):
    raise BenchmarkError(f"{where(source, index)}: field 'image': empty")
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise BenchmarkError(f"{where(source, index)}: field 'image': not base64 ({e})") from e


def shifted(options: list[str], answer: int, shift: int) -> tuple[list[str], int]:
  """Options rotated left by `shift` and the answer's new position."""
  n = len(options)
  return options[shift:] + options[:shift], (answer - shift) % n


def read(data: str, circular: bool = True) -> list[Question]:
  """The questions of the TSV at `data`; with `circular`, every shift of each (see above)."""
  rows = read_rows(data)
  by_index = {}
  for number, row in enumerate(rows, 2):  # line 1 is the header
    try:
      by_index[int(float(row["index"]))] = row
    except (TypeError, ValueError) as e:
      raise BenchmarkError(f"{data}: line {number}: field 'index': not a number: "
                           f"{row['index']!r}") from e
  has_copies = any(i >= SHIFT for i in by_index)
  out = []
  for index, row in by_index.items():
    if index >= SHIFT and not circular:
      continue
    options = options_of(row)
    if len(options) < 2:
      raise BenchmarkError(f"{where(data, index)}: fields 'A'..: expected at least 2 options, "
                           f"got {options}")
    answer = cell(row, "answer")
    if answer not in LETTERS[:len(options)]:
      raise BenchmarkError(f"{where(data, index)}: field 'answer': expected one of "
                           f"{list(LETTERS[:len(options)])}, got {row['answer']!r}")
    image = image_bytes(row, by_index, data, index)
    hint = "" if is_blank(row.get("hint")) else cell(row, "hint") + "\n"
    shifts = range(len(options)) if circular and not has_copies else [0]
    for shift in shifts:
      texts, position = shifted(options, LETTERS.index(answer), shift)
      out.append(Question(
          id=str(index + shift * SHIFT), image=image,
          prompt=choice_prompt(cell(row, "question"), texts, hint),
          answer=LETTERS[position], category=cell(row, "category"),
          options={LETTERS[i]: t for i, t in enumerate(texts)},
          group=str(index % SHIFT), shift=index // SHIFT + shift, source=data))
  return out
