"""The grain pipeline: batch layout, resumable state, packing, sharding, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from infllava_jax.config import ConfigError, load_config
from infllava_jax.data import pipeline, sources
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.model.infllava import num_image_tokens

IMG = -200


def _config(**data):
  overrides = {"synthetic.num_train": 24, "synthetic.image_size": 126, "batch_size": 4,
               "max_length": 128, **data}
  cfg = load_config("configs/synthetic.py",
                    [f"--config.data.{k}={v}" for k, v in overrides.items()])
  cfg.model.dcm.image_size = 84  # keep arrays small; N_img stays 36
  return cfg


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in pipeline.BATCH_KEYS)


def test_host_batch_size_divides_the_global_batch_over_processes():
  stage1 = load_config("configs/infllava_8b_stage1.py")
  assert [pipeline.host_batch_size(stage1, n) for n in (1, 2, 16)] == [256, 128, 16]
  with pytest.raises(ConfigError, match="global_batch_size 256 does not divide over 3 proc"):
    pipeline.host_batch_size(stage1, 3)
  stage1.data.batch_size = 64
  with pytest.raises(ConfigError, match=r"data.batch_size 64 x 2 processes disagrees with "
                                        r"train.global_batch_size 256"):
    pipeline.host_batch_size(stage1, 2)
  assert pipeline.host_batch_size(stage1, 4) == 64  # both set, and agreeing
  synthetic = load_config("configs/synthetic.py")  # rows per process only
  assert pipeline.host_batch_size(synthetic, 2) == synthetic.data.batch_size == 8
  synthetic.data.batch_size = None
  with pytest.raises(ConfigError, match="set train.global_batch_size"):
    pipeline.host_batch_size(synthetic, 1)


def test_batch_layout():
  cfg = _config()
  b = next(pipeline.make_iterator(cfg, process_index=0, process_count=1))
  assert sorted(b) == sorted(pipeline.BATCH_KEYS)
  assert b["tokens"].shape == (4, 128) and b["tokens"].dtype == np.int32
  assert b["loss_mask"].dtype == np.float32 and b["pixels"].shape == (4, 1, 84, 84, 3)
  n_img = num_image_tokens(cfg.model)
  for r in range(4):
    valid = b["segment_ids"][r] == 1
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any()
    assert (b["tokens"][r, n:] == 511).all()  # the shipped tokenizer's <pad>
    assert b["positions"][r, :n].tolist() == list(range(n))
    assert (b["tokens"][r] == IMG).sum() == n_img
    sup = b["loss_mask"][r] > 0
    # Targets are the next tokens; never image slots or padding.
    assert (b["targets"][r, :-1][sup[:-1]] == b["tokens"][r, 1:][sup[:-1]]).all()
    assert not (b["targets"][r][sup] < 0).any()
  assert b["pixels"].std() > 0.1


@pytest.mark.parametrize("packing, workers", [(False, 0), (True, 0), pytest.param(True, 1, marks=pytest.mark.slow)])
def test_resume_mid_epoch_yields_the_same_batches(packing, workers):
  cfg = _config(packing=packing, max_images_per_row=2, max_length=200, worker_count=workers)
  it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  _batches(it, 2)
  state = it.get_state()
  expected = _batches(it, 5)  # crosses the 24-record epoch boundary
  counts = it.counts
  it.close()
  resumed = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  resumed.set_state(json.loads(json.dumps(state)))  # the state is JSON-able
  got = _batches(resumed, 5)
  resumed.close()
  assert all(_equal(a, b) for a, b in zip(expected, got))
  # Samples the packer had buffered are replayed, never counted twice.
  assert resumed.counts == counts


def _decoded_samples(cfg, source):
  decoder = pipeline.SampleDecoder(
      template="llama3", image_token_id=IMG, num_image_tokens=num_image_tokens(cfg.model),
      image_size=cfg.model.dcm.image_size, image_aspect="pad", max_length=10_000,
      overlong="truncate", double_bos=True, tokenizer_path=None)
  return [decoder.map(source[i]) for i in range(len(source))]


def test_packing_segments_positions_targets_and_images(tmp_path):
  cfg = _config(packing=True, max_images_per_row=2, max_length=300, shuffle=False)
  source = _mixed_json(tmp_path, num_image=6, num_text=6)
  samples = _decoded_samples(cfg, source)
  by_tokens = {s["tokens"].tobytes(): s for s in samples}
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1, num_epochs=1)
  seen = 0
  for b in it:
    for r in range(b["tokens"].shape[0]):
      seg = b["segment_ids"][r]
      n_images = 0
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert where.tolist() == list(range(where[0], where[-1] + 1))  # contiguous
        sample = by_tokens[b["tokens"][r, where].tobytes()]
        assert b["positions"][r, where].tolist() == list(range(len(where)))
        np.testing.assert_array_equal(b["targets"][r, where], sample["targets"])
        np.testing.assert_array_equal(b["loss_mask"][r, where], sample["loss_mask"])
        if len(sample["pixels"]):
          # The k-th image of the row belongs to the k-th segment that has slots.
          np.testing.assert_array_equal(b["pixels"][r, n_images], sample["pixels"][0])
          n_images += 1
        seen += 1
      assert n_images <= 2
      assert not b["pixels"][r, n_images:].any()
      assert (b["tokens"][r][seg == 0] == 511).all() and not b["loss_mask"][r][seg == 0].any()
  assert seen == 12 == it.counts["samples"]


def test_host_shards_are_disjoint_and_cover_the_data():
  cfg = _config(batch_size=2)
  ids = []
  for p in range(2):
    it = pipeline.make_iterator(cfg, process_index=p, process_count=2, num_epochs=1)
    # Questions repeat across records; the images tell records apart.
    ids.append({b["pixels"][r].tobytes() for b in it for r in range(2)})
  assert len(ids[0]) == len(ids[1]) == 12 and not ids[0] & ids[1]


def _write_png(path, size=(40, 30)):
  Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


def _mixed_json(tmp_path, num_image, num_text):
  records = []
  for i in range(num_image):
    _write_png(tmp_path / f"{i}.png", (30 + i, 20 + 2 * i))
    records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat color is the sign {i}?"},
        {"from": "gpt", "value": "Red " * (i + 1)}]})
  for i in range(num_text):
    records.append({"id": f"txt{i}", "conversations": [
        {"from": "human", "value": f"How many objects are there {i}?"},
        {"from": "gpt", "value": "Two " * (i + 1)}]})
  path = tmp_path / "mix.json"
  path.write_text(json.dumps(records))
  return sources.LlavaJsonSource(str(path), str(tmp_path))


def test_group_by_modality_batches_are_single_modality(tmp_path):
  cfg = _config(group_by_modality=True, batch_size=2)
  source = _mixed_json(tmp_path, num_image=6, num_text=4)
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1, num_epochs=2)
  kinds = []
  for b in it:
    has = (b["tokens"] == IMG).any(1)
    assert has.all() or not has.any()
    kinds.append(bool(has[0]))
  assert len(kinds) == 10 and sum(kinds) == 6  # 2 epochs: 3 image and 2 text batches each


def test_group_by_modality_pads_each_epoch_to_whole_batches(tmp_path):
  # 5 image and 4 text records, groups of 2: 4 groups, then the leftover image and one
  # empty row. Without the padding, epoch 2 would start mid-batch, off its groups.
  cfg = _config(group_by_modality=True, batch_size=2)
  source = _mixed_json(tmp_path, num_image=5, num_text=4)
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1, num_epochs=2)
  batches = list(it)
  assert len(batches) == 10
  for i, b in enumerate(batches):
    used = b["segment_ids"].any(1)
    has = (b["tokens"] == IMG).any(1)[used]
    assert has.all() or not has.any(), i
    assert used.all() == (i not in (4, 9)), i  # each epoch's last batch: image + empty row
  assert it.counts["samples"] == 18


def test_group_by_modality_keeps_each_skipped_samples_slot(tmp_path):
  # 4 image and 4 text records, groups of 2; one image file is missing. Dropping that
  # sample would shift every later batch across its group's boundary.
  cfg = _config(group_by_modality=True, batch_size=2, skip_bad_samples=True)
  source = _mixed_json(tmp_path, num_image=4, num_text=4)
  (tmp_path / "2.png").unlink()
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1, num_epochs=1)
  batches = list(it)
  assert len(batches) == 4
  blanks = 0
  for b in batches:
    used = b["segment_ids"].any(1)
    has = (b["tokens"] == IMG).any(1)
    assert has[used].all() or not has[used].any()
    for r in np.flatnonzero(~used):  # the missing image's slot: no token, no loss
      blanks += 1
      assert not b["loss_mask"][r].any() and not b["pixels"][r].any()
  assert blanks == 1
  assert it.counts == {"samples": 7, "bad_skipped": 1, "truncated": 0, "overlong_dropped": 0}


def test_group_by_modality_with_every_sample_bad_still_raises(tmp_path):
  cfg = _config(group_by_modality=True, batch_size=2, skip_bad_samples=True)
  source = _mixed_json(tmp_path, num_image=2, num_text=0)
  for i in range(2):
    (tmp_path / f"{i}.png").unlink()
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1)
  with pytest.raises(pipeline.BadSampleError, match="2 samples in a row"):
    next(it)


def test_group_by_modality_refuses_packing(tmp_path):
  cfg = _config(group_by_modality=True, packing=True)
  with pytest.raises(ValueError, match="group_by_modality needs data.packing=False"):
    pipeline.make_iterator(cfg, _mixed_json(tmp_path, 2, 2), process_index=0, process_count=1)


BAD = {
    "missing image": ({"id": "r1", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]},
                      r"record 'r1': field 'image': image file .*nope\.png.* not found"),
    "corrupt image": ({"id": "r2", "image": "corrupt.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]},
                      r"record 'r2': field 'image': cannot decode image .*corrupt\.png"),
    "malformed record": ({"id": "r3", "conversation": []},
                         r"record 'r3': malformed record: field 'conversations' missing"),
    "image without placeholder": ({"id": "r4", "image": "ok.png", "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "A"}]},
                                  r"record 'r4': .*has an image but .* 0 '<image>'"),
    "placeholder without image": ({"id": "r5", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]},
                                  r"record 'r5': .*holds '<image>' but the record has no image"),
    "roles not alternating": ({"id": "r6", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"}]},
                              r"record 'r6': .*roles do not alternate"),
    "empty conversation": ({"id": "r7", "conversations": []},
                           r"record 'r7': .*empty or missing 'conversations'"),
}
GOOD = {"id": "good", "image": "ok.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]}


def _bad_source(tmp_path, records):
  _write_png(tmp_path / "ok.png")
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  path = tmp_path / "data.json"
  path.write_text(json.dumps(records))
  return sources.LlavaJsonSource(str(path), str(tmp_path))


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_stops_with_file_record_and_reason(tmp_path, kind):
  record, pattern = BAD[kind]
  cfg = _config(batch_size=2, shuffle=False)
  source = _bad_source(tmp_path, [GOOD, record, GOOD, GOOD])
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1)
  with pytest.raises(pipeline.BadSampleError, match="data.json: " + pattern):
    next(it)


def test_bad_input_skipped_and_counted(tmp_path):
  cfg = _config(batch_size=2, shuffle=False, skip_bad_samples=True)
  records = [GOOD] + [r for r, _ in BAD.values()] + [GOOD]
  it = pipeline.make_iterator(cfg, _bad_source(tmp_path, records), process_index=0,
                              process_count=1, num_epochs=1)
  batches = list(it)
  assert len(batches) == 1
  assert it.counts == {"samples": 2, "bad_skipped": len(BAD), "truncated": 0,
                       "overlong_dropped": 0}


def test_a_dataset_where_every_sample_is_dropped_raises_instead_of_looping(tmp_path):
  long = {"id": "long", "conversations": [
      {"from": "human", "value": "Describe the picture. " * 40},
      {"from": "gpt", "value": "A cat."}]}
  cfg = _config(batch_size=1, shuffle=False, max_length=128, overlong="drop")
  it = pipeline.make_iterator(cfg, _bad_source(tmp_path, [long, long, long]),
                              process_index=0, process_count=1, num_epochs=None)
  with pytest.raises(pipeline.BadSampleError,
                     match=r"3 samples in a row were dropped.*'overlong_dropped': 3.*max_length"):
    next(it)


@pytest.mark.parametrize("packing", [False, True])
def test_text_only_rows_carry_no_image(tmp_path, packing):
  text = {"id": "t", "conversations": [{"from": "human", "value": "Is there a person?"},
                                       {"from": "gpt", "value": "Yes."}]}
  cfg = _config(batch_size=2, shuffle=False, max_images_per_row=0, packing=packing)
  batch = next(pipeline.make_iterator(cfg, _bad_source(tmp_path, [text] * 4),
                                      process_index=0, process_count=1))
  assert batch["pixels"].shape == (2, 0, 84, 84, 3)
  assert IMG not in batch["tokens"] and batch["loss_mask"].sum() > 0
  it = pipeline.make_iterator(cfg, _bad_source(tmp_path, [text, GOOD]), process_index=0,
                              process_count=1)
  with pytest.raises(pipeline.BadSampleError,
                     match=r"record 'good': field 'image': the record has an image but "
                           r"data.max_images_per_row=0"):
    next(it)


def test_label_rule_is_checked_and_reaches_the_samples(tmp_path):
  # A tokenizer with LLaMA-3's "\n\n\n" token, and an answer starting with "\n" after the
  # header's "\n\n": the reference's rule masks the merged token, the "spans" rule does not.
  from infllava_jax.data import build_tokenizer
  folder = str(tmp_path / "tokenizer")
  texts = build_tokenizer.corpus() + ["Why?\n\n\nBecause.\n\n\n"] * 30
  build_tokenizer.save(build_tokenizer.build(texts), folder)
  assert len(load_tokenizer(folder)("\n\n\n", add_special_tokens=False)["input_ids"]) == 1
  record = {"id": "n", "conversations": [{"from": "human", "value": "Why?"},
                                         {"from": "gpt", "value": "\nBecause."}]}
  masks = []
  for rule in ("reference", "spans"):
    cfg = _config(batch_size=1, shuffle=False, label_rule=rule)
    cfg.data.tokenizer_path = folder
    masks.append(next(pipeline.make_iterator(cfg, _bad_source(tmp_path, [record]),
                                             process_index=0, process_count=1))["loss_mask"])
  assert masks[1].sum() == masks[0].sum() + 1
  with pytest.raises(ConfigError, match=r"data.label_rule must be one of \('reference', "
                                        r"'spans'\), got 'chars'"):
    pipeline.make_iterator(_config(label_rule="chars"), process_index=0, process_count=1)


def test_overlong_samples_are_counted(tmp_path):
  long = {"id": "long", "conversations": [
      {"from": "human", "value": "Describe the picture. " * 40},
      {"from": "gpt", "value": "A cat."}]}
  for policy, expected in (("drop", {"samples": 2, "overlong_dropped": 1, "truncated": 0}),
                           ("truncate", {"samples": 3, "truncated": 1, "overlong_dropped": 0})):
    cfg = _config(batch_size=1, shuffle=False, max_length=128, overlong=policy)
    it = pipeline.make_iterator(cfg, _bad_source(tmp_path, [GOOD, long, GOOD]),
                                process_index=0, process_count=1, num_epochs=1)
    list(it)
    assert it.counts == {"bad_skipped": 0, **expected}, policy
