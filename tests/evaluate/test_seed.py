"""SEED-Bench reader: image questions of SEED-Bench.json, categories are question types."""

import copy
import os

import pytest

from infllava_jax.evaluate import seed
from infllava_jax.evaluate.records import BenchmarkError
from tests.evaluate import bench_files


def test_reads_image_questions(tmp_path):
  folder = bench_files.write_seed(tmp_path / "seed")
  questions = seed.read(folder)
  assert [q.id for q in questions] == ["101669_0", "3"]  # the video question is skipped
  first = questions[0]
  assert first.prompt == ("How many towels are in the image?\nA. One\nB. Two\nC. Three\n"
                          "D. Four\nAnswer with the option's letter from the given choices "
                          "directly.")
  assert first.answer == "A" and first.category == "Instance Counting"
  assert first.options == {"A": "One", "B": "Two", "C": "Three", "D": "Four"}
  assert first.image == os.path.join(folder, "SEED-Bench-image", "1454426_2591111986.jpg")
  assert questions[1].category == "Scene Understanding" and questions[1].answer == "C"
  same = seed.read(os.path.join(folder, "SEED-Bench.json"),
                   images=os.path.join(folder, "SEED-Bench-image"))
  assert [q.image for q in same] == [q.image for q in questions]


def test_errors_name_file_question_and_field(tmp_path):
  content = copy.deepcopy(bench_files.SEED_QUESTIONS)
  del content["questions"][2]["choice_c"]
  folder = bench_files.write_seed(tmp_path / "a", content)
  with pytest.raises(BenchmarkError, match=r"SEED-Bench\.json: record 3: missing field "
                                           "'choice_c'"):
    seed.read(folder)

  content = copy.deepcopy(bench_files.SEED_QUESTIONS)
  content["questions"][0]["answer"] = "E"
  folder = bench_files.write_seed(tmp_path / "b", content)
  with pytest.raises(BenchmarkError, match=r"record 101669_0: field 'answer'.*'E'"):
    seed.read(folder)

  folder = bench_files.write_seed(tmp_path / "c")
  os.remove(os.path.join(folder, "SEED-Bench-image", "2271_3311.jpg"))
  with pytest.raises(BenchmarkError, match=r"record 3: field 'data_id': image file not found"):
    seed.read(folder)
