"""The record every benchmark reader produces, and the helpers readers share.

A `Question` is one prompt to ask about one image and what counts as its right answer:

  Question(id="sqa/12", image="data/images/test/12/image.png",
           prompt="Context: ...\\nWhich ...?\\nA. cat\\nB. dog\\nAnswer with the option's ...",
           answer="B", category="natural science", options={"A": "cat", "B": "dog"})

`kind` says how an answer is scored (`scoring.score`): "choice" (an option letter parsed
from the output), "yesno" (POPE's yes/no parsing) or "exact" (case-insensitive equality).
MMBench's CircularEval asks one question several times with its options shifted: those
records share a `group` and differ in `shift` (0: the options as the file gives them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string
from typing import Any, Iterable, Mapping, Sequence

KINDS = ("choice", "yesno", "exact")
LETTERS = string.ascii_uppercase
# The instruction LLaVA-1.5 / lmms-eval append to multiple-choice questions.
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# ... in its Chinese form for Chinese questions (LLaVA's model_vqa_mmbench --lang cn, for
# MMBench-CN; VLMEvalKit picks it by the same test of the text, `cn_string`).
CHOICE_INSTRUCTION_CN = "请直接回答选项字母。"
_CJK = re.compile("[\u4e00-\u9fff]")
# ... and to short-answer questions (POPE).
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."


class BenchmarkError(ValueError):
  """A benchmark file or record that cannot be used; the message names file, record, field."""


@dataclasses.dataclass(frozen=True)
class Question:
  """One question about one image.

  image: a file path, encoded image bytes or a uint8 [H, W, 3] array (`data.images.decode`).
  options: option letter -> option text, in prompt order ({} for open answers).
  source: the file the record was read from, for error messages.
  """
  id: str
  image: Any
  prompt: str
  answer: str
  category: str
  options: Mapping[str, str] = dataclasses.field(default_factory=dict)
  kind: str = "choice"
  group: str = ""
  shift: int = 0
  source: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"record {self.id}: kind {self.kind!r} is not one of {KINDS}")

  @property
  def group_id(self) -> str:
    return self.group or self.id


def read_json(path: str) -> Any:
  """A JSON file's content, or a BenchmarkError naming the file."""
  if not os.path.isfile(path):
    raise BenchmarkError(f"{path}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise BenchmarkError(f"{path}: not valid JSON: {e}") from e


def where(source: str, record_id: Any) -> str:
  """'file: record ID' for error messages."""
  return f"{source}: record {record_id}"


def field(record: Mapping[str, Any], name: str, source: str, record_id: Any) -> Any:
  """`record[name]`, or a BenchmarkError naming the file, the record and the field."""
  if name not in record:
    raise BenchmarkError(f"{where(source, record_id)}: missing field {name!r}")
  return record[name]


def is_blank(value: Any) -> bool:
  """True for the ways a table leaves a cell empty: None, NaN, '', 'nan', 'none'."""
  if value is None:
    return True
  if isinstance(value, float):
    return math.isnan(value)
  return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def choice_prompt(question: str, options: Sequence[str], context: str = "") -> str:
  """LLaVA's multiple-choice prompt: context, question, 'A. ...' lines, the instruction
  (Chinese when the question, its options or context hold Chinese characters)."""
  lines = [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]
  chinese = _CJK.search("".join([context, question, *options]))
  return "\n".join([f"{context}{question}", *lines,
                    CHOICE_INSTRUCTION_CN if chinese else CHOICE_INSTRUCTION])


def lettered(options: Sequence[str]) -> dict[str, str]:
  """['cat', 'dog'] -> {'A': 'cat', 'B': 'dog'}."""
  if len(options) > len(LETTERS):
    raise ValueError(f"{len(options)} options: at most {len(LETTERS)} can be lettered")
  return {LETTERS[i]: text for i, text in enumerate(options)}


def find_image(name: str, folders: Sequence[str], source: str, record_id: Any,
               field_name: str = "image") -> str:
  """The first `folder/name` that is a file, or an error listing where it was looked for."""
  if not isinstance(name, str) or not name:
    raise BenchmarkError(f"{where(source, record_id)}: field {field_name!r}: expected a file "
                         f"name, got {name!r}")
  for folder in folders:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  looked = ", ".join(repr(os.path.join(f, name)) for f in folders)
  raise BenchmarkError(f"{where(source, record_id)}: field {field_name!r}: image file not "
                       f"found (looked for {looked})")


def limit(records: Iterable[Question], num: int | None) -> list[Question]:
  """The records of the first `num` groups (a circular group is kept whole); None: all."""
  records = list(records)
  if num is None:
    return records
  kept: set[str] = set()
  out = []
  for record in records:
    if record.group_id not in kept:
      if len(kept) >= num:
        continue
      kept.add(record.group_id)
    out.append(record)
  return out
