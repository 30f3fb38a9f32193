"""The metadata pass over LLaVA JSON records (data/checks.py)."""

import pytest

from infllava_jax.errors import ConfigError
from infllava_jax.data import checks

QA = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]
TEXT_QA = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]


def _problems(records, folder, template="llama3", text_only=False):
  return checks.find_problems(records, str(folder), template=template, text_only=text_only)


def test_image_files_are_looked_up_on_local_disks_only(tmp_path):
  (tmp_path / "coco").mkdir()
  (tmp_path / "coco" / "1.jpg").write_bytes(b"")
  records = [{"id": "a", "image": "coco/1.jpg", "conversations": QA},
             {"id": "b", "image": "coco/2.jpg", "conversations": QA},
             {"id": "c", "image": "vg/1.jpg", "conversations": QA}]
  assert _problems(records, tmp_path) == {
      1: f"field 'image': image file {str(tmp_path / 'coco' / '2.jpg')!r} not found",
      2: f"field 'image': image file {str(tmp_path / 'vg' / '1.jpg')!r} not found"}
  # On a bucket the files are found as they are read; the rest is still checked.
  assert _problems(records, "gs://bucket/images") == {}
  assert set(_problems(records + [{"id": "d"}], "gs://bucket/images")) == {3}


def test_template_and_text_only_rules(tmp_path):
  (tmp_path / "x.png").write_bytes(b"")
  image = {"id": "i", "image": "x.png", "conversations": QA}
  text = {"id": "t", "conversations": TEXT_QA}
  assert _problems([image, text], tmp_path) == {}
  assert _problems([image, text], tmp_path, template="plain") == {
      1: "field 'conversations': the plain template needs an image sample"}
  assert _problems([image, text], tmp_path, text_only=True) == {
      0: f"field 'image': {checks.TEXT_ONLY_IMAGE}"}


def test_one_line_names_the_first_few_and_counts_all(tmp_path):
  records = [{"id": f"r{i}"} for i in range(5)] + [["not", "an", "object"]]
  problems = _problems(records, tmp_path)
  assert len(problems) == 6
  with pytest.raises(ConfigError) as error:
    checks.enforce(problems, records, "d.json", skip_bad=False)
  message = str(error.value)
  assert "\n" not in message
  assert message == (
      "d.json: 6 of 6 records are bad: record #0 (id 'r0'): malformed record: field "
      "'conversations' missing; record #1 (id 'r1'): malformed record: field 'conversations' "
      "missing; record #2 (id 'r2'): malformed record: field 'conversations' missing; 3 more "
      "(fix them, or set data.skip_bad_samples=True to skip them)")
  with pytest.raises(ConfigError, match=r"6 of 6 records are bad: .*; 3 more: no record to "
                                        r"train on$"):
    checks.enforce(problems, records, "d.json", skip_bad=True)
  skipped = checks.enforce({5: problems[5]}, records, "d.json", skip_bad=True)
  assert skipped == ("d.json: 1 of 6 records are bad: record #5: malformed record: the record "
                     "is a list, not an object (skipped: data.skip_bad_samples=True)")
