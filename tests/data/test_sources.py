"""Sources: the synthetic generator, its LLaVA JSON / TFDS writer, and the readers."""

import json

import numpy as np
import pytest
from PIL import Image

from infllava_jax.data import cli, images, sources, synthetic


def test_synthetic_is_deterministic_and_prefix_stable():
  a = list(synthetic.synthetic_examples("train", 5, seed=3, image_size=126))
  b = list(synthetic.synthetic_examples("train", 3, seed=3, image_size=126))
  for x, y in zip(a, b):
    assert x["id"] == y["id"] and x["conversations"] == y["conversations"]
    np.testing.assert_array_equal(x["image"], y["image"])
  assert a[0]["image"].shape == (126, 126, 3) and a[0]["image"].dtype == np.uint8


def test_heldout_split_differs_from_train():
  train = [r["image"] for r in synthetic.synthetic_examples("train", 20, 0, 126)]
  held = [r["image"] for r in synthetic.synthetic_examples("heldout", 20, 0, 126)]
  assert not any(np.array_equal(t, h) for t in train for h in held)
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.synthetic_example("val", 0, 0, 126)


def test_answers_come_from_closed_sets_and_marks_are_small():
  for r in synthetic.synthetic_examples("train", 30, 1, 252, max_turns=3,
                                        kinds=("letter", "count")):
    conv = r["conversations"]
    assert conv[0]["value"].startswith("<image>\n")
    assert sum("<image>" in m["value"] for m in conv) == 1
    for q, a in zip(conv[::2], conv[1::2]):
      assert a["value"] in synthetic.answer_set(r["kind"])
      assert any(cell in q["value"] for cell in synthetic.CELL_NAMES)
  # At 252 px a letter is 10x14 px: strokes are 2 px, below one pixel after a /3 resize.
  assert synthetic._letter_mask("E", 252 // 126).shape == (14, 10)


def test_pattern_records_ask_one_question_about_the_whole_image():
  records = list(synthetic.synthetic_examples("train", 40, 0, 252, max_turns=3))
  assert {r["kind"] for r in records} == {"pattern"}  # the default kinds
  assert {r["conversations"][1]["value"] for r in records} == set(synthetic.PATTERNS)
  for r in records:
    assert [m["value"] for m in r["conversations"]][0] == (
        "<image>\n" + synthetic.QUESTIONS["pattern"])
    assert len(r["conversations"]) == 2
  mixed = [r["kind"] for r in synthetic.synthetic_examples("train", 40, 0, 126,
                                                           kinds=synthetic.KINDS)]
  assert set(mixed) == set(synthetic.KINDS)
  with pytest.raises(ValueError, match="subset"):
    synthetic.synthetic_example("train", 0, 0, 126, kinds=("shapes",))


def test_patterns_differ_at_252_px_and_vanish_in_the_84_px_baseline_view():
  flat, size = np.array([120, 90, 160]), 252
  no_noise = np.zeros((size, size, 3), int)
  drawn = {a: synthetic.pattern_image(a, flat, no_noise, (1, 0)) for a in synthetic.PATTERNS}
  assert np.all(drawn["plain"] == flat)
  for a in synthetic.PATTERNS[:3]:
    # Full resolution: every pixel is +-AMPLITUDE away from the flat colour.
    diff = drawn[a].astype(int) - flat
    assert np.all(np.abs(diff) == synthetic.AMPLITUDE) and diff.sum() == 0
    # The baseline's 84 px view (CLIPImageProcessor's bicubic resize, in float here to see
    # below one grey level): inside a 2 px border, lines leave +-0.49 levels (1.2% of the
    # amplitude; the per-pixel noise of the real images is +-NOISE) and checks nothing.
    low = np.asarray(Image.fromarray(diff[..., 0].astype(np.float32), "F").resize(
        (84, 84), Image.BICUBIC))
    assert np.abs(low[2:-2, 2:-2]).max() < (0.5 if a != "checkered" else 0.01)
  # Through the model's preprocessing (uint8 resize, CLIP normalisation): the plain and
  # patterned low-res views agree to rounding, the 252 px ones differ everywhere.
  pix = {a: images.preprocess(x, 84) for a, x in drawn.items()}
  hi = {a: images.preprocess(x, 252) for a, x in drawn.items()}
  for a in synthetic.PATTERNS[:3]:
    assert np.abs(pix[a] - pix["plain"])[2:-2, 2:-2].max() < 0.02
    assert np.abs(hi[a] - hi["plain"]).min() > 0.5


def test_letter_is_drawn_in_its_cell():
  rng = np.random.default_rng(0)
  image, answers = synthetic.render(rng, "letter", 252)
  cell = image[:84, :84].astype(int)
  ink = (cell.sum(-1) < 3 * 120)
  rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
  glyph = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  assert glyph.shape == (14, 10)
  np.testing.assert_array_equal(glyph, synthetic._letter_mask(answers[0], 2))


@pytest.mark.parametrize("size", [224, 252, 336])
def test_marks_stay_in_their_cells_at_every_image_size(size, monkeypatch):
  stamped = []
  stamp = synthetic._stamp
  monkeypatch.setattr(synthetic, "_stamp", lambda image, mask, top, left, colour: (
      stamped.append((top, left, *mask.shape)), stamp(image, mask, top, left, colour)))
  rng = np.random.default_rng(0)
  cell = size // synthetic.GRID
  for kind in ("letter", "count"):
    for _ in range(40):
      stamped.clear()
      synthetic.render(rng, kind, size)
      for k, (top, left, h, w) in enumerate(stamped):
        row, col = divmod(k, synthetic.GRID)
        assert row * cell <= top and top + h <= (row + 1) * cell, (kind, k, top, h)
        assert col * cell <= left and left + w <= (col + 1) * cell, (kind, k, left, w)


def test_cli_writes_json_pngs_and_array_record(tmp_path, capsys):
  assert cli.main(["synth", "--out", str(tmp_path), "--num", "3", "--num-heldout", "2",
                   "--image-size", "126", "--seed", "5"]) == 0
  assert "3/3 images" in capsys.readouterr().out
  expected = list(synthetic.synthetic_examples("train", 3, 5, 126))
  js = sources.LlavaJsonSource(str(tmp_path / "train.json"), str(tmp_path / "images"))
  tf = sources.TfdsSource(str(tmp_path / "tfds" / "synthetic_detail" / "1.0.0"), "train")
  assert len(js) == len(tf) == 3
  assert len(sources.TfdsSource(str(tmp_path / "tfds" / "synthetic_detail" / "1.0.0"),
                                "heldout")) == 2
  by_id = {r["id"]: r for r in expected}
  for src in (js, tf):
    for i in range(3):
      rec = src[i]
      ref = by_id[rec["id"]]
      assert rec["conversations"] == ref["conversations"]
      img = rec["image"]
      pixels = np.asarray(Image.open(img) if isinstance(img, str) else
                          Image.open(__import__("io").BytesIO(img)))
      np.testing.assert_array_equal(pixels, ref["image"])
  assert repr(tf) == repr(sources.TfdsSource(str(tmp_path / "tfds/synthetic_detail/1.0.0"),
                                             "train"))


def test_ids_name_the_kinds_and_a_rewrite_replaces_both_formats(tmp_path):
  pattern = synthetic.synthetic_example("train", 0, 0, 126)
  letters = synthetic.synthetic_example("train", 0, 0, 126, kinds=("letter", "count"))
  assert pattern["id"] == "synth-pattern-train-0-0000000"
  assert letters["id"] == "synth-letter+count-train-0-0000000"
  # Writing another set into the same folder replaces the TFDS copy as well as the JSON
  # (tfds reuses a prepared dataset unless told otherwise).
  for kinds in ("pattern", "letter,count"):
    assert cli.main(["synth", "--out", str(tmp_path), "--num", "2", "--num-heldout", "1",
                     "--image-size", "126", "--kinds", kinds]) == 0
  expected = [r["id"] for r in synthetic.synthetic_examples("train", 2, 0, 126,
                                                            kinds=("letter", "count"))]
  js = sources.LlavaJsonSource(str(tmp_path / "train.json"), str(tmp_path / "images"))
  tf = sources.TfdsSource(str(tmp_path / "tfds" / "synthetic_detail" / "1.0.0"), "train")
  assert sorted(js[i]["id"] for i in range(2)) == sorted(tf[i]["id"] for i in range(2)) \
      == sorted(expected)


def test_llava_json_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json"):
    sources.LlavaJsonSource(str(tmp_path / "missing.json"), "")
  bad = tmp_path / "bad.json"
  bad.write_text("[{")
  with pytest.raises(ValueError, match="bad.json: not valid JSON"):
    sources.LlavaJsonSource(str(bad), "")
  obj = tmp_path / "obj.json"
  obj.write_text(json.dumps({"id": 1}))
  with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
    sources.LlavaJsonSource(str(obj), "")


def test_llava_json_malformed_records_are_flagged(tmp_path):
  Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
  qa = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]
  path = tmp_path / "d.json"
  path.write_text(json.dumps([
      {"id": "a", "image": "x.png", "conversations": qa},
      "just a string",
      {"id": "c"},
      {"conversations": []},
      {"id": "e", "image": 3, "conversations": []},
      {"id": "f", "image": "gone.png", "conversations": qa},
      {"id": "g", "conversations": [{"from": "gpt", "value": "A"}, {"from": "gpt", "value": "B"}]},
  ]))
  src = sources.LlavaJsonSource(str(path), str(tmp_path))
  assert "error" not in src[0] and src[0]["image"] == str(tmp_path / "x.png")
  assert src.has_image(0) and not src.has_image(2)
  assert sorted(src.problems) == [1, 2, 3, 4, 5, 6]
  assert "the record is a str" in src[1]["error"] and src[1]["id"] == "#1"
  assert src[2]["id"] == "c" and "'conversations' missing" in src[2]["error"]
  assert "'id' missing" in src[3]["error"]
  assert "'image' must be a path" in src[4]["error"]
  assert src[5]["error"] == f"field 'image': image file {str(tmp_path / 'gone.png')!r} not found"
  assert "roles do not alternate" in src[6]["error"]
