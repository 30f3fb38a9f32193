"""POPE reader: coco_pope_<category>.json JSON Lines, category from the file name or field."""

import json
import os

import pytest

from infllava_jax.evaluate import pope
from infllava_jax.evaluate.records import BenchmarkError
from tests.evaluate import bench_files


def test_reads_a_folder_of_question_files(tmp_path):
  folder, images = bench_files.write_pope(tmp_path / "pope")
  questions = pope.read(folder, images)
  assert [q.id for q in questions] == ["adversarial/1", "adversarial/2", "random/1"]
  first = questions[0]
  assert first.prompt == ("Is there a snowboard in the image?\n"
                          "Answer the question using a single word or phrase.")
  assert first.answer == "yes" and first.kind == "yesno"
  assert first.category == "adversarial"  # from the file name: the record has no category
  assert first.image == os.path.join(images, "COCO_val2014_000000310196.jpg")
  assert [q.answer for q in questions] == ["yes", "no", "yes"]
  assert questions[2].category == "random"
  # One file as --data.
  single = pope.read(os.path.join(folder, "coco_pope_random.json"), images)
  assert [q.id for q in single] == ["random/1"]


def test_errors_name_file_question_and_field(tmp_path):
  folder, images = bench_files.write_pope(tmp_path / "pope")
  path = os.path.join(folder, "questions.jsonl")  # no category in its name
  with open(path, "w") as f:
    f.write(json.dumps({**bench_files.POPE_ADVERSARIAL[0], "question_id": 31}) + "\n")
  with pytest.raises(BenchmarkError, match=r"questions\.jsonl: record 31: missing field "
                                           "'category'"):
    pope.read(path, images)

  with open(path, "w") as f:
    f.write(json.dumps({"question_id": 32, "image": "x.jpg", "text": "Is it?",
                        "category": "random"}) + "\n")
  with pytest.raises(BenchmarkError, match=r"record 32: missing field 'label'"):
    pope.read(path, images)

  with open(path, "w") as f:
    f.write(json.dumps({"question_id": 33, "image": "missing.jpg", "text": "Is it?",
                        "label": "no", "category": "random"}) + "\n")
  with pytest.raises(BenchmarkError, match=r"record 33: field 'image': image file not found"):
    pope.read(path, images)

  with pytest.raises(BenchmarkError, match="no POPE question files"):
    pope.read(str(tmp_path), images)
