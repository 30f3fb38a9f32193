"""POPE: yes/no object-hallucination questions on COCO val2014 images.

The question files are LLaVA's / lmms-eval's `coco_pope_<category>.json`: JSON Lines of

  {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
   "text": "Is there a snowboard in the image?", "label": "yes", "category": "adversarial"}

where the category (adversarial, popular, random) comes from the record or, when absent,
from the file name. `--data` is one such file or a folder of them (every `*pope*.json`,
`*pope*.jsonl`); the images are in the COCO folder given with `--images` (default: the
question file's folder). The prompt is the question and LLaVA's short-answer instruction.
"""

from __future__ import annotations

import glob
import json
import os
import re

from infllava_jax.evaluate.records import (SHORT_INSTRUCTION, BenchmarkError, Question, field,
                                           find_image, where)

FILE_CATEGORY = re.compile(r"pope_([A-Za-z]+)\.jsonl?$")


def question_files(data: str) -> list[str]:
  """`data` itself, or the POPE question files in the folder `data`."""
  if os.path.isfile(data):
    return [data]
  if not os.path.isdir(data):
    raise BenchmarkError(f"{data}: no such POPE question file or folder")
  files = sorted({*glob.glob(os.path.join(data, "*pope*.json")),
                  *glob.glob(os.path.join(data, "*pope*.jsonl"))})
  if not files:
    raise BenchmarkError(f"{data}: no POPE question files (*pope*.json, *pope*.jsonl) in it")
  return files


def read_lines(path: str) -> list[dict]:
  """The records of a JSON Lines file (or of a file holding one JSON list)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise BenchmarkError(f"{path}: not valid JSON: {e}") from e
  records = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise BenchmarkError(f"{path}: line {number}: not valid JSON: {e}") from e
  return records


def read(data: str, images: str | None = None) -> list[Question]:
  """Every question of the file(s) at `data`, ids 'CATEGORY/QUESTION_ID'."""
  out = []
  for path in question_files(data):
    folder = images or os.path.dirname(os.path.abspath(path))
    match = FILE_CATEGORY.search(os.path.basename(path))
    for line, record in enumerate(read_lines(path), 1):
      if not isinstance(record, dict):
        raise BenchmarkError(f"{path}: line {line}: expected a JSON object")
      qid = record.get("question_id", f"line {line}")
      field(record, "question_id", path, qid)
      out.append(question(record, path, folder, match.group(1) if match else None))
  return out


def question(record: dict, source: str, folder: str, file_category: str | None) -> Question:
  """One POPE record -> Question (answer 'yes' or 'no')."""
  qid = record["question_id"]
  category = record.get("category") or file_category
  if not category:
    raise BenchmarkError(f"{where(source, qid)}: missing field 'category' (and the file name "
                         "is not coco_pope_<category>.json)")
  label = str(field(record, "label", source, qid)).strip().lower()
  if label not in ("yes", "no"):
    raise BenchmarkError(f"{where(source, qid)}: field 'label': expected 'yes' or 'no', "
                         f"got {record['label']!r}")
  text = str(field(record, "text", source, qid)).strip()
  path = find_image(field(record, "image", source, qid), [folder], source, qid)
  return Question(id=f"{category}/{qid}", image=path, prompt=f"{text}\n{SHORT_INSTRUCTION}",
                  answer=label, category=str(category), kind="yesno", source=source)
