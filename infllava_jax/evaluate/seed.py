"""SEED-Bench (v1): the image questions of `SEED-Bench.json`.

  {"questions": [{"question_id": "101669_0", "question": "...", "choice_a": "...", ...,
                  "choice_d": "...", "answer": "A", "question_type_id": 1,
                  "data_type": "image", "data_id": "1454426_2591111986.jpg"}, ...],
   "question_type": {"Scene Understanding": 1, ...}}

Video questions are skipped. Images are `IMAGES/<data_id>` with IMAGES the `--images`
folder, else `SEED-Bench-image/` beside the json, else the json's own folder. The prompt is
LLaVA's (question, "A. choice" lines, letter instruction); categories are question types.
"""

from __future__ import annotations

import os

from infllava_jax.evaluate.records import (BenchmarkError, Question, choice_prompt, field,
                                           find_image, lettered, read_json, where)

FILE = "SEED-Bench.json"
IMAGE_FOLDER = "SEED-Bench-image"
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


def read(data: str, images: str | None = None) -> list[Question]:
  """The image questions of `data` (the json, or the folder holding SEED-Bench.json)."""
  path = data if os.path.isfile(data) else os.path.join(data, FILE)
  content = read_json(path)
  if not isinstance(content, dict) or not isinstance(content.get("questions"), list):
    raise BenchmarkError(f"{path}: expected an object with a 'questions' list")
  root = os.path.dirname(os.path.abspath(path))
  folders = [images] if images else [os.path.join(root, IMAGE_FOLDER), root]
  type_names = {int(v): k for k, v in content.get("question_type", {}).items()}
  out = []
  for number, record in enumerate(content["questions"]):
    qid = record.get("question_id", f"#{number}") if isinstance(record, dict) else f"#{number}"
    if not isinstance(record, dict):
      raise BenchmarkError(f"{where(path, qid)}: expected an object")
    if field(record, "data_type", path, qid) != "image":
      continue
    out.append(question(record, path, folders, type_names))
  return out


def question(record: dict, source: str, folders: list[str],
             type_names: dict[int, str]) -> Question:
  """One SEED-Bench image question -> Question."""
  qid = field(record, "question_id", source, record.get("question_id"))
  texts = [str(field(record, c, source, qid)).strip() for c in CHOICES]
  options = lettered(texts)
  answer = str(field(record, "answer", source, qid)).strip()
  if answer not in options:
    raise BenchmarkError(f"{where(source, qid)}: field 'answer': expected one of "
                         f"{list(options)}, got {record['answer']!r}")
  type_id = field(record, "question_type_id", source, qid)
  try:
    category = type_names.get(int(type_id), str(type_id))
  except (TypeError, ValueError) as e:
    raise BenchmarkError(f"{where(source, qid)}: field 'question_type_id': not a number: "
                         f"{type_id!r}") from e
  path = find_image(field(record, "data_id", source, qid), folders, source, qid, "data_id")
  question_text = str(field(record, "question", source, qid)).strip()
  return Question(id=str(qid), image=path, prompt=choice_prompt(question_text, texts),
                  answer=answer, category=category, options=options, source=source)
