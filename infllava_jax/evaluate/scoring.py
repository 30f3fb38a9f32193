"""Answer parsing and metrics: pure functions of the model's text and the references.

Option letters are parsed the way the common scripts do, first rule that fits wins:

  1. the whole answer is an option letter, in either case ("B", "B.", "(b)": lmms-eval's
     ScienceQA compares lower-cased; a bare letter can only name an option)
  2. it starts with one: "B. dog", "B) dog", "(B) dog", "[B]", "B: dog"
  3. "the answer is B" / "Answer: (B)"
  4. VLMEvalKit's can_infer_option: exactly one option letter among the words once
     .()[],:;!*#{} are blanked ("I pick C" -> C; "A or B" -> none)
  5. VLMEvalKit's can_infer_text: exactly one option's text appears in the answer
     (case-insensitive)

and otherwise the answer is unparsed (None), which counts as wrong. Yes/no answers follow
LLaVA's eval_pope.py: only the first sentence counts, commas are dropped, and it is "no"
when one of its words is "No", "no" or "not", else "yes".
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from infllava_jax.evaluate.records import Question

_WHOLE = re.compile(r"^[(\[]?([A-Za-z])[)\]]?\.?$")
_LEADING = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?:[.):]|$))")
_ANSWER_IS = re.compile(r"answer(?: is)?\s*:?\s*[(\[]?([A-Z])\b", re.IGNORECASE)
_BLANKED = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def parse_letter(text: str, options: Mapping[str, str]) -> str | None:
  """The option letter an answer picks, or None (rules in the module docstring)."""
  text = text.strip()
  letters = set(options)
  whole = _WHOLE.match(text)
  if whole and whole.group(1).upper() in letters:
    return whole.group(1).upper()
  match = _LEADING.match(text)
  if match:
    letter = next(g for g in match.groups() if g)
    if letter in letters:
      return letter
  found = [m for m in _ANSWER_IS.findall(text) if m in letters]
  if len(set(found)) == 1:
    return found[0]
  words = set(text.translate(_BLANKED).split())
  named = letters & words
  if len(named) == 1:
    return named.pop()
  lowered = text.lower()
  matched = [k for k, v in options.items() if v.strip() and v.strip().lower() in lowered]
  return matched[0] if len(matched) == 1 else None


def parse_yes_no(text: str) -> str:
  """'yes' or 'no', as LLaVA's eval_pope.py reads an answer."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def score(question: Question, text: str) -> tuple[str | None, bool]:
  """(parsed answer, right?) for one output text."""
  if question.kind == "choice":
    parsed = parse_letter(text, question.options)
  elif question.kind == "yesno":
    parsed = parse_yes_no(text)
  else:
    parsed = text.strip().lower()
    return parsed, parsed == question.answer.strip().lower()
  return parsed, parsed == question.answer


def accuracy(pairs: Iterable[tuple[str, bool]]) -> dict:
  """[(category, right)] -> {"accuracy", "count", "by_category": {c: accuracy},
  "count_by_category": {c: n}}; an empty input has accuracy 0."""
  hits, totals = defaultdict(int), defaultdict(int)
  for category, right in pairs:
    hits[category] += bool(right)
    totals[category] += 1
  count = sum(totals.values())
  return {"accuracy": sum(hits.values()) / count if count else 0.0, "count": count,
          "by_category": {c: hits[c] / totals[c] for c in sorted(totals)},
          "count_by_category": {c: totals[c] for c in sorted(totals)}}


def yes_no_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict:
  """LLaVA's POPE numbers with "yes" positive: accuracy, precision, recall, F1, yes ratio."""
  if len(labels) != len(predictions):
    raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
  pairs = list(zip(labels, predictions))
  tp = sum(l == "yes" and p == "yes" for l, p in pairs)
  fp = sum(l == "no" and p == "yes" for l, p in pairs)
  tn = sum(l == "no" and p == "no" for l, p in pairs)
  fn = sum(l == "yes" and p == "no" for l, p in pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  n = len(pairs)
  return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
          "f1": f1, "yes_ratio": (tp + fp) / n if n else 0.0, "count": n,
          "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def circular(rows: Iterable[tuple[Question, bool]]) -> dict:
  """CircularEval: a group (one question, all its shifts) is right when every shift is.

  Returns {"circular": accuracy(...) over groups, "vanilla": accuracy(...) over shift 0}.
  """
  groups: dict[str, list[tuple[Question, bool]]] = defaultdict(list)
  for question, right in rows:
    groups[question.group_id].append((question, right))
  whole = [(min(g, key=lambda r: r[0].shift)[0].category, all(r for _, r in g))
           for g in groups.values()]
  first = [(q.category, right) for g in groups.values() for q, right in g if q.shift == 0]
  return {"circular": accuracy(whole), "vanilla": accuracy(first)}


def summarize(benchmark: str, rows: Sequence[tuple[Question, str, str | None, bool]]) -> dict:
  """The summary of one benchmark run from its (question, output, parsed, right) rows.

  Always: records (questions asked), questions, accuracy, by_category, count_by_category,
  unparsed (choice answers with no option letter). MMBench: accuracy is CircularEval's
  (questions = groups) and "vanilla" holds the first-pass numbers. POPE: "pope" holds
  yes_no_metrics overall and per category.
  """
  if any(q.group for q, *_ in rows):
    result = circular((q, right) for q, _, _, right in rows)
    headline, extra = result["circular"], {"vanilla": result["vanilla"]}
  else:
    headline, extra = accuracy((q.category, right) for q, _, _, right in rows), {}
  summary = {"benchmark": benchmark, "records": len(rows), "questions": headline.pop("count"),
             **headline, **extra}
  summary["unparsed"] = sum(q.kind == "choice" and parsed is None for q, _, parsed, _ in rows)
  if any(q.kind == "yesno" for q, *_ in rows):
    by_category = defaultdict(list)
    for q, _, parsed, _ in rows:
      by_category[q.category].append((q.answer, parsed))
    overall = [pair for pairs in by_category.values() for pair in pairs]
    summary["pope"] = {
        "overall": yes_no_metrics(*zip(*overall)),
        "by_category": {c: yes_no_metrics(*zip(*pairs)) for c, pairs in
                        sorted(by_category.items())}}
  return summary
