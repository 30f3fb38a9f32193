"""Golden tests of answer parsing and the metrics: fixed outputs -> exact known numbers."""

import pytest

from infllava_jax.evaluate import scoring
from infllava_jax.evaluate.records import Question, limit

FOUR = {"A": "green", "B": "blue", "C": "red", "D": "black"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" B. ", "B"), ("B. blue", "B"), ("B) blue", "B"), ("(C) red", "C"),
    ("[A]", "A"), ("D: black", "D"), ("C\n", "C"),
    ("The answer is C.", "C"), ("Answer: (B)", "B"),
    ("Between A and B, the answer is B.", "B"),  # rule 3 before the word count
    ("I think it is D", "D"),                     # 'I' is no option: one letter named
    ("blue", "B"), ("It is Blue.", "B"),          # the option's text
    ("A or B", None),                             # two letters named
    ("blue-green", None),                         # two option texts
    ("E", None), ("E. purple", None),             # not an option here
    ("b", "B"), ("(c)", "C"), ("d.", "D"),      # a bare letter in lower case
    ("", None), ("purple", None),
])
def test_parse_letter(text, expected):
  assert scoring.parse_letter(text, FOUR) == expected


def test_parse_letter_respects_the_question_options():
  three = {"A": "cow", "B": "horse", "C": "sheep"}
  assert scoring.parse_letter("D", three) is None
  assert scoring.parse_letter("C. sheep", three) == "C"
  assert scoring.parse_letter("a sheep", three) == "C"


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("Yes, there is a snowboard in the image.", "yes"),
    ("No", "no"), ("no.", "no"), ("No, there is no dining table.", "no"),
    ("There is not a cat", "no"), ("Yes. No dog though.", "yes"),  # first sentence only
    ("NO", "yes"), ("nope", "yes"), ("", "yes"),                  # LLaVA's rule, as it is
])
def test_parse_yes_no_as_llava_eval_pope(text, expected):
  assert scoring.parse_yes_no(text) == expected


def test_yes_no_metrics_golden():
  labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
  preds = ["yes", "no", "yes", "yes", "yes", "no", "no", "yes"]
  m = scoring.yes_no_metrics(labels, preds)
  assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
  assert m["accuracy"] == 5 / 8 and m["precision"] == 3 / 5 and m["recall"] == 3 / 4
  assert m["f1"] == pytest.approx(2 / 3, abs=1e-12)
  assert m["yes_ratio"] == 5 / 8 and m["count"] == 8
  never = scoring.yes_no_metrics(["yes", "no"], ["no", "no"])
  assert (never["precision"], never["recall"], never["f1"], never["accuracy"]) == (0, 0, 0, .5)


def _q(qid, answer, category, kind="choice", options=FOUR, group="", shift=0):
  return Question(id=qid, image=None, prompt="?", answer=answer, category=category,
                  options=options if kind == "choice" else {}, kind=kind, group=group,
                  shift=shift)


def test_score_by_kind():
  assert scoring.score(_q("1", "B", "c"), "B. blue") == ("B", True)
  assert scoring.score(_q("1", "B", "c"), "maybe") == (None, False)
  assert scoring.score(_q("1", "no", "c", "yesno"), "No.") == ("no", True)
  assert scoring.score(_q("1", "X", "c", "exact"), " x ") == ("x", True)
  assert scoring.score(_q("1", "X", "c", "exact"), "X.") == ("x.", False)


def test_accuracy_per_category_golden():
  result = scoring.accuracy([("a", True), ("a", False), ("b", True), ("a", True)])
  assert result == {"accuracy": 0.75, "count": 4, "by_category": {"a": 2 / 3, "b": 1.0},
                    "count_by_category": {"a": 3, "b": 1}}
  assert scoring.accuracy([])["accuracy"] == 0.0


def test_circular_eval_one_wrong_shift_fails_the_question():
  rows = []
  for shift in range(4):  # question 0: shift 2 wrong
    rows.append((_q(str(shift * 1000000), "B", "attr", group="0", shift=shift), shift != 2))
  for shift in range(3):  # question 7: all right
    rows.append((_q(str(7 + shift * 1000000), "C", "loc", group="7", shift=shift), True))
  rows.append((_q("9", "A", "attr", group="9"), False))  # one shift, wrong
  result = scoring.circular(rows)
  assert result["circular"]["accuracy"] == 1 / 3
  assert result["circular"]["by_category"] == {"attr": 0.0, "loc": 1.0}
  assert result["circular"]["count"] == 3
  assert result["vanilla"]["accuracy"] == 2 / 3  # shift 0 of questions 0 and 7 right
  assert result["vanilla"]["by_category"] == {"attr": 0.5, "loc": 1.0}


def test_summarize_mmbench_and_unparsed():
  outputs = {0: "B", 1: "A.", 2: "no idea", 3: "C"}  # shift 2 unparsed -> wrong
  answers = ["B", "A", "D", "C"]
  rows = []
  for shift in range(4):
    q = _q(str(shift * 1000000), answers[shift], "attr", group="0", shift=shift)
    rows.append((q, outputs[shift], *scoring.score(q, outputs[shift])))
  summary = scoring.summarize("mmbench", rows)
  assert summary["records"] == 4 and summary["questions"] == 1
  assert summary["accuracy"] == 0.0 and summary["vanilla"]["accuracy"] == 1.0
  assert summary["unparsed"] == 1


def test_summarize_pope_golden():
  data = [("adversarial", "yes", "Yes"), ("adversarial", "no", "No."),
          ("adversarial", "no", "Yes, there is."), ("random", "yes", "There is not."),
          ("random", "no", "no")]
  rows = []
  for i, (category, label, output) in enumerate(data):
    q = _q(str(i), label, category, "yesno")
    rows.append((q, output, *scoring.score(q, output)))
  summary = scoring.summarize("pope", rows)
  assert summary["accuracy"] == 3 / 5 and summary["questions"] == 5
  assert summary["by_category"] == {"adversarial": 2 / 3, "random": 0.5}
  adv = summary["pope"]["by_category"]["adversarial"]
  assert (adv["precision"], adv["recall"], adv["yes_ratio"]) == (0.5, 1.0, 2 / 3)
  overall = summary["pope"]["overall"]
  assert (overall["tp"], overall["fp"], overall["tn"], overall["fn"]) == (1, 1, 2, 1)
  assert overall["f1"] == 0.5 and summary["unparsed"] == 0


def test_limit_keeps_whole_groups():
  qs = [_q("0", "A", "c", group="0"), _q("7", "A", "c", group="7"),
        _q("1000000", "A", "c", group="0", shift=1), _q("1000007", "A", "c", group="7", shift=1),
        _q("9", "A", "c", group="9")]
  assert [q.id for q in limit(qs, 1)] == ["0", "1000000"]
  assert [q.id for q in limit(qs, 2)] == ["0", "7", "1000000", "1000007"]
  assert len(limit(qs, None)) == 5
