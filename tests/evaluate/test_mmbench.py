"""MMBench reader: TSV rows with base64 images, one record per circular shift."""

import base64

import pytest

from infllava_jax.data import images
from infllava_jax.evaluate import mmbench
from infllava_jax.evaluate.records import BenchmarkError
from tests.evaluate import bench_files

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def test_reads_rows_with_every_circular_shift(tmp_path):
  path = bench_files.write_mmbench(tmp_path / "mmbench" / "MMBench_DEV_EN.tsv")
  questions = mmbench.read(path)
  # Row 0 has 4 options (4 shifts); row 7 has 3 ('D' empty), so 3 shifts.
  assert [(q.id, q.group, q.shift) for q in questions] == [
      ("0", "0", 0), ("1000000", "0", 1), ("2000000", "0", 2), ("3000000", "0", 3),
      ("7", "7", 0), ("1000007", "7", 1), ("2000007", "7", 2)]
  sky = questions[0]
  assert sky.prompt == ("What colour is the sky?\nA. green\nB. blue\nC. red\nD. black\n"
                        + INSTRUCTION)  # hint 'nan': no hint line
  assert sky.answer == "B" and sky.category == "attribute_recognition"
  assert images.decode(sky.image).getpixel((3, 3)) == (10, 120, 240)  # the base64 PNG
  # Shift 1: texts rotate left by one, the answer letter follows 'blue'.
  assert questions[1].options == {"A": "blue", "B": "red", "C": "black", "D": "green"}
  assert questions[1].answer == "A"
  assert [q.answer for q in questions[:4]] == ["B", "A", "D", "C"]
  farm = questions[4:]
  assert farm[0].prompt == ("The picture was taken at a farm.\nWhich animal is it?\n"
                            "A. cow\nB. horse\nC. sheep\n" + INSTRUCTION)
  assert [q.answer for q in farm] == ["C", "B", "A"]
  assert farm[2].prompt.endswith("A. sheep\nB. cow\nC. horse\n" + INSTRUCTION)
  assert images.decode(farm[0].image).size == (20, 12)  # the base64 JPEG
  vanilla = mmbench.read(path, circular=False)
  assert [q.id for q in vanilla] == ["0", "7"]


def test_chinese_questions_get_the_chinese_instruction(tmp_path):
  row = {**bench_files.mmbench_rows()[0], "question": "天空是什么颜色？", "A": "绿色",
         "B": "蓝色", "C": "红色", "D": "黑色"}
  question = mmbench.read(bench_files.write_mmbench(tmp_path / "MMBench_DEV_CN.tsv", [row]),
                          circular=False)[0]
  assert question.prompt == "天空是什么颜色？\nA. 绿色\nB. 蓝色\nC. 红色\nD. 黑色\n请直接回答选项字母。"


def test_file_with_its_own_shifted_copies_is_used_as_is(tmp_path):
  rows = bench_files.mmbench_rows()[:1]
  copy = {**rows[0], "index": 1000000, "A": "blue", "B": "red", "C": "black", "D": "green",
          "answer": "A", "image": "0"}  # VLMEvalKit: the image cell names row 0
  path = bench_files.write_mmbench(tmp_path / "dev.tsv", rows + [copy])
  questions = mmbench.read(path)
  assert [(q.id, q.group, q.shift, q.answer) for q in questions] == [
      ("0", "0", 0, "B"), ("1000000", "0", 1, "A")]
  assert questions[1].image == questions[0].image


def test_errors_name_file_row_and_field(tmp_path):
  columns = [c for c in bench_files.MMBENCH_COLUMNS if c != "answer"]
  path = bench_files.write_mmbench(tmp_path / "a.tsv", columns=columns)
  with pytest.raises(BenchmarkError, match=r"a\.tsv: missing column\(s\) \['answer'\]"):
    mmbench.read(path)

  rows = bench_files.mmbench_rows()
  rows[1]["image"] = "not base64 at all!"
  path = bench_files.write_mmbench(tmp_path / "b.tsv", rows)
  with pytest.raises(BenchmarkError, match=r"b\.tsv: record 7: field 'image': not base64"):
    mmbench.read(path)

  rows = bench_files.mmbench_rows()
  rows[1]["answer"] = "D"  # row 7 has only A-C
  path = bench_files.write_mmbench(tmp_path / "c.tsv", rows)
  with pytest.raises(BenchmarkError, match=r"record 7: field 'answer'.*got 'D'"):
    mmbench.read(path)

  rows = bench_files.mmbench_rows()
  rows[0]["image"] = base64.b64encode(b"not an image").decode()
  path = bench_files.write_mmbench(tmp_path / "d.tsv", rows)
  questions = mmbench.read(path)  # valid base64: decoding the picture fails later, by record
  with pytest.raises(images.ImageError):
    images.decode(questions[0].image)
