"""`infllava data pack` and the array_record source: same batches as the JSON, resume,
per-process sharding, bad records and corrupted shards."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from infllava_jax.config import ConfigError, load_config
from infllava_jax.data import pack, pipeline, sources
from infllava_jax.data.packed import PackedSource
from tests.run_cli import error_line, infllava


def _config(**data):
  overrides = {"batch_size": 2, "max_length": 128, **data}
  cfg = load_config("configs/synthetic.py",
                    [f"--config.data.{k}={v}" for k, v in overrides.items()])
  cfg.model.dcm.image_size = 84
  return cfg


def _llava_json(tmp_path, num_image=7, num_text=3, extra=()):
  """A LLaVA JSON of distinct PNG/JPEG images (in a sub-folder) and text-only records."""
  (tmp_path / "images" / "sub").mkdir(parents=True)
  records = []
  for i in range(num_image):
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 255, (20 + 3 * i, 30 + i, 3), np.uint8)
    name = f"sub/{i}." + ("jpg" if i % 2 else "png")
    Image.fromarray(pixels).save(tmp_path / "images" / name)
    records.append({"id": f"img{i}", "image": name, "conversations": [
        {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
        {"from": "gpt", "value": "A cat. " * (i + 1)}]})
  for i in range(num_text):
    records.append({"id": f"txt{i}", "conversations": [
        {"from": "human", "value": f"Count to {i}."},
        {"from": "gpt", "value": "One " * (i + 1)}]})
  records += list(extra)
  path = tmp_path / "data.json"
  path.write_text(json.dumps(records))
  return str(path), str(tmp_path / "images")


def _batches(cfg, source, n, **kwargs):
  it = pipeline.make_iterator(cfg, source, process_index=0, process_count=1, **kwargs)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("group_by_modality", [False, True])
def test_packed_shards_give_the_json_sources_records_and_batches(tmp_path, group_by_modality):
  json_path, images = _llava_json(tmp_path)
  index = pack.pack(json_path, images, str(tmp_path / "out"), num_shards=3, workers=2,
                    progress=lambda _: None)
  assert index["records"] == 10 and [s["records"] for s in index["shards"]] == [3, 3, 4]
  assert index["images"] == "as_is" and index["skipped"] == 0
  from grain.sources import ArrayRecordDataSource  # plain ArrayRecord files
  assert len(ArrayRecordDataSource([str(tmp_path / "out" / s["name"])
                                    for s in index["shards"]])) == 10
  json_source = sources.LlavaJsonSource(json_path, images)
  cfg = _config(source="array_record", path=str(tmp_path / "out"),
                group_by_modality=group_by_modality)
  packed = sources.make_source(cfg.data)
  assert len(packed) == len(json_source) == 10
  for i in range(10):
    a, b = json_source[i], packed[i]
    assert (a["id"], a["conversations"]) == (b["id"], b["conversations"])
    assert packed.has_image(i) == json_source.has_image(i)
    if a["image"] is not None:
      with open(a["image"], "rb") as f:
        assert f.read() == b["image"]  # the bytes as they were
  for x, y in zip(_batches(cfg, json_source, 4), _batches(cfg, packed, 4)):
    assert set(x) == set(pipeline.BATCH_KEYS)
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def test_resumed_pack_equals_an_uninterrupted_one(tmp_path):
  json_path, images = _llava_json(tmp_path)
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  pack.pack(json_path, images, str(whole), num_shards=3, progress=lambda _: None)
  pack.pack(json_path, images, str(cut), num_shards=3, progress=lambda _: None)
  # Interrupted while writing shard 1: no .done marker, a partial file, no index.
  (cut / (pack.shard_name(1, 3) + ".done")).unlink()
  (cut / pack.shard_name(1, 3)).write_bytes(b"partial")
  (cut / pack.INDEX).unlink()
  kept = (cut / pack.shard_name(0, 3)).stat().st_mtime_ns
  lines = []
  pack.pack(json_path, images, str(cut), num_shards=3, progress=lines.append)
  assert lines[0] == "resuming: 2 of 3 shards already written"
  assert (cut / pack.shard_name(0, 3)).stat().st_mtime_ns == kept  # not redone
  for name in sorted(os.listdir(whole)):
    assert (whole / name).read_bytes() == (cut / name).read_bytes(), name
  with pytest.raises(ConfigError, match="holds a pack of another JSON or other settings"):
    pack.pack(json_path, images, str(cut), num_shards=2, progress=lambda _: None)


def test_per_process_shards_cover_every_record_once_per_epoch(tmp_path):
  json_path, images = _llava_json(tmp_path, num_image=8, num_text=0)
  pack.pack(json_path, images, str(tmp_path / "out"), num_shards=3, progress=lambda _: None)
  cfg = _config(source="array_record", path=str(tmp_path / "out"))
  source = sources.make_source(cfg.data)
  seen = []
  for p in range(2):
    it = pipeline.make_iterator(cfg, source, process_index=p, process_count=2, num_epochs=1)
    seen.append([b["pixels"][r].tobytes() for b in it for r in range(2)])
  assert len(seen[0]) == len(seen[1]) == 4
  everything = {b["pixels"][r].tobytes()
                for b in _batches(_config(source="array_record", path=str(tmp_path / "out"),
                                          shuffle=False), source, 4) for r in range(2)}
  assert len(everything) == 8 and set(seen[0]) | set(seen[1]) == everything
  assert not set(seen[0]) & set(seen[1])


def test_max_side_shrinks_only_large_images(tmp_path):
  json_path, images = _llava_json(tmp_path, num_image=4, num_text=0)
  index = pack.pack(json_path, images, str(tmp_path / "out"), max_side=31,
                    progress=lambda _: None)
  assert index["images"] == {"max_side": 31, "reencoded": 2}  # 31x23 and 30x20 stay
  source = PackedSource(str(tmp_path / "out"))
  sizes = [Image.open(__import__("io").BytesIO(source[i]["image"])).size for i in range(4)]
  assert sizes[:2] == [(30, 20), (31, 23)] and max(sizes[2]) == max(sizes[3]) == 31


def test_bad_records_stop_the_pack_or_are_skipped(tmp_path):
  extra = [{"id": "noconv"}, {"id": "lost", "image": "sub/missing.png", "conversations": [
      {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}]
  json_path, images = _llava_json(tmp_path, num_image=2, num_text=1, extra=extra)
  with pytest.raises(ConfigError) as e:
    pack.pack(json_path, images, str(tmp_path / "a"), progress=lambda _: None)
  assert str(e.value).startswith(f"{json_path}: 2 of 5 records are bad: record #3 "
                                 "(id 'noconv'): malformed record: field 'conversations'")
  assert "pass --skip-bad" in str(e.value)
  lines = []
  index = pack.pack(json_path, images, str(tmp_path / "b"), skip_bad=True,
                    progress=lines.append)
  assert index["records"] == 3 and index["skipped"] == 2
  assert lines[0].endswith("(skipped: --skip-bad)")


def test_corrupted_shard_is_named_in_one_line(tmp_path):
  json_path, images = _llava_json(tmp_path, num_image=4, num_text=0)
  out = tmp_path / "out"
  pack.pack(json_path, images, str(out), num_shards=2, progress=lambda _: None)
  shard = out / pack.shard_name(1, 2)
  data = shard.read_bytes()
  flipped = data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:]
  for corrupted, what in ((data[: len(data) // 2], "cannot open this ArrayRecord shard"),
                          (flipped, "record 0 cannot be read: Corrupted Riegeli")):
    shard.write_bytes(corrupted)
    source = PackedSource(str(out))
    assert source[0]["id"] == "img0"  # the other shard reads
    with pytest.raises(ConfigError) as e:
      source[2]
    message = str(e.value)
    assert message.startswith(f"{shard}: {what}") and "\n" not in message


def test_pack_cli(tmp_path):
  json_path, images = _llava_json(tmp_path, num_image=2, num_text=1, extra=[{"id": "x"}])
  done = infllava("data", "pack", "--json", json_path, "--images", images,
                  "--out", tmp_path / "out", "--shards", 2, "--skip-bad", "--workers", 2)
  assert done.returncode == 0, done.stderr
  assert f"wrote 3 records in 2 shards (1 skipped): {tmp_path / 'out'}" in done.stdout
  assert "shard 2/2 written" in done.stdout
  refused = infllava("data", "pack", "--json", json_path, "--images", images,
                     "--out", tmp_path / "other")
  assert "1 of 4 records are bad: record #3 (id 'x')" in error_line(refused, "data")


def test_pack_reads_and_writes_bucket_paths_through_epath(tmp_path):
  """gs:// paths go through etils.epath: here its test mock maps gs://bucket to a folder
  (every epath call; array_record itself writes a local temporary file)."""
  from etils.epath import testing as epath_testing
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  json_path, images = _llava_json(bucket, num_image=3, num_text=1, extra=[
      {"id": "gone", "image": "sub/gone.png", "conversations": [
          {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}])
  local = lambda p: str(p).replace("gs://bucket", str(bucket))

  def redirect(fn, path, *args, **kwargs):
    if args and isinstance(args[0], str) and "://" in args[0]:  # copy/rename's destination
      args = (local(args[0]), *args[1:])
    return fn(local(path), *args, **kwargs)

  calls = []
  def counted(fn, path, *args, **kwargs):
    calls.append(str(path))
    return redirect(fn, path, *args, **kwargs)

  mocks = {name: counted for name in ("open", "exists", "isdir", "listdir", "glob", "makedirs",
                                      "mkdir", "remove", "rename", "replace", "rmtree", "stat",
                                      "walk")}
  with epath_testing.mock_epath(copy=counted, **mocks):
    with pytest.raises(ConfigError, match=r"record #4 \(id 'gone'\): field 'image': cannot "
                                          r"read image 'sub/gone.png'"):
      pack.pack("gs://bucket/data.json", "gs://bucket/images", "gs://bucket/out",
                num_shards=2, workers=1, progress=lambda _: None)
    index = pack.pack("gs://bucket/data.json", "gs://bucket/images", "gs://bucket/out2",
                      num_shards=2, workers=1, skip_bad=True, progress=lambda _: None)
  assert index["records"] == 4 and index["skipped"] == 1
  # (The shards' writers run in worker processes: their calls are not counted here.)
  assert {"gs://bucket/data.json", "gs://bucket/out2/plan.json",
          "gs://bucket/out2/index.json"} <= set(calls)
  source = PackedSource(str(bucket / "out2"))
  assert [source[i]["id"] for i in range(4)] == ["img0", "img1", "img2", "txt0"]
