"""ScienceQA reader: image questions of the test split, LLaVA's prompt, both image layouts."""

import copy
import os

import pytest

from infllava_jax.data import images
from infllava_jax.evaluate import scienceqa
from infllava_jax.evaluate.records import BenchmarkError
from tests.evaluate import bench_files


def test_reads_image_questions_of_the_test_split(tmp_path):
  root = bench_files.write_scienceqa(tmp_path / "sqa")
  questions = scienceqa.read(root)
  # pid 7 has no image, pid 9 is in train: only 5 and 11, in the split's order.
  assert [q.id for q in questions] == ["5", "11"]
  first, second = questions
  assert first.prompt == ("Context: Select the best estimate.\nWhich is the hottest?\n"
                          "A. 50°C\nB. 50°F\nC. 5°C\n"
                          "Answer with the option's letter from the given choices directly.")
  assert first.answer == "A" and first.options == {"A": "50°C", "B": "50°F", "C": "5°C"}
  assert first.category == "natural science" and first.kind == "choice"
  assert first.image == os.path.join(root, "images", "test", "5", "image.png")
  assert images.decode(first.image).getpixel((0, 0)) == (200, 30, 30)
  # No hint: no "Context:" line. Image found in the ROOT/test/PID layout.
  assert second.prompt.startswith("Which country is highlighted?\nA. Fiji\nB. Tonga\n")
  assert second.answer == "B" and second.category == "social science"
  assert second.image == os.path.join(root, "test", "11", "image.png")
  # problems.json itself may be given as --data; --images overrides where images are.
  assert [q.id for q in scienceqa.read(os.path.join(root, "problems.json"))] == ["5", "11"]


def test_images_flag_names_the_pid_folders(tmp_path):
  root = bench_files.write_scienceqa(tmp_path / "sqa")
  other = tmp_path / "elsewhere"
  for pid in ("5", "11"):
    bench_files.save_image(other / pid / "image.png", (1, 2, 3))
  questions = scienceqa.read(root, images=str(other))
  assert [q.image for q in questions] == [str(other / "5" / "image.png"),
                                          str(other / "11" / "image.png")]


def test_errors_name_file_problem_and_field(tmp_path):
  problems = copy.deepcopy(bench_files.SQA_PROBLEMS)
  del problems["11"]["choices"]
  root = bench_files.write_scienceqa(tmp_path / "a", problems)
  with pytest.raises(BenchmarkError, match=r"problems\.json: record 11: missing field 'choices'"):
    scienceqa.read(root)

  problems = copy.deepcopy(bench_files.SQA_PROBLEMS)
  problems["5"]["answer"] = 3
  root = bench_files.write_scienceqa(tmp_path / "b", problems)
  with pytest.raises(BenchmarkError, match=r"record 5: field 'answer'.*got 3"):
    scienceqa.read(root)

  root = bench_files.write_scienceqa(tmp_path / "c")
  os.remove(os.path.join(root, "test", "11", "image.png"))
  with pytest.raises(BenchmarkError, match=r"record 11: field 'image': image file not found"):
    scienceqa.read(root)

  os.remove(os.path.join(root, "pid_splits.json"))
  with pytest.raises(BenchmarkError, match=r"pid_splits\.json: file not found"):
    scienceqa.read(root)
