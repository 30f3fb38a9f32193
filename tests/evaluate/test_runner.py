"""Runner: fixed-size batches (last one padded), scored rows, one jsonl line per question."""

import json

import pytest

from infllava_jax import generate
from infllava_jax.evaluate import runner
from infllava_jax.evaluate.records import BenchmarkError, Question
from tests.evaluate import bench_files


class Recorder:
  """Stands in for Assistant: answers 'A' to every prompt and records the batch sizes."""

  def __init__(self, answer="A"):
    self.answer, self.batches = answer, []

  def ask_batch(self, image_list, questions, sampling):
    assert len(image_list) == len(questions)
    assert all(im.mode == "RGB" for im in image_list)  # decoded before the model sees them
    self.batches.append(list(questions))
    return [self.answer] * len(questions)


def _questions(n):
  png = bench_files.image_bytes((1, 2, 3))
  return [Question(id=str(i), image=png, prompt=f"q{i}", answer="AB"[i % 2], category="c",
                   options={"A": "x", "B": "y"}) for i in range(n)]


def test_batches_are_padded_and_predictions_written(tmp_path):
  assistant = Recorder()
  path = tmp_path / "out" / "predictions.jsonl"
  rows = runner.run(assistant, _questions(5), generate.Sampling(max_new_tokens=2),
                    batch_size=2, predictions=str(path), progress=False)
  assert [len(b) for b in assistant.batches] == [2, 2, 2]
  assert assistant.batches[-1] == ["q4", "q4"]  # the last question repeats as padding
  assert [(q.id, out, parsed, right) for q, out, parsed, right in rows] == [
      ("0", "A", "A", True), ("1", "A", "A", False), ("2", "A", "A", True),
      ("3", "A", "A", False), ("4", "A", "A", True)]
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert len(lines) == 5
  assert lines[1] == {"id": "1", "category": "c", "prompt": "q1", "answer": "B",
                      "output": "A", "parsed": "A", "correct": False}


def test_undecodable_image_names_the_record():
  bad = Question(id="42", image=b"not an image", prompt="q", answer="A", category="c",
                 options={"A": "x"}, source="MMBench.tsv")
  with pytest.raises(BenchmarkError, match=r"MMBench\.tsv: record 42: field 'image': cannot "
                                           "decode image"):
    runner.run(Recorder(), [bad], generate.Sampling(), batch_size=1, progress=False)
