"""`infllava data pack`: a LLaVA JSON + its image folder → ArrayRecord shards.

Layout of OUT (a local folder or any `etils.epath` path: gs://, s3://...):

    OUT/records-00000-of-00004.array_record   the records, in the JSON's order (bad ones left
    ...                                       out), shard i holding a contiguous block of them
    OUT/index.json                            {"format", "records", "shards": [{"name",
                                              "records"}], "source_json", "source_sha256",
                                              "images", "skipped", "has_image"}

Each shard is a plain ArrayRecord file (one record per sample, group_size 1 for random
access), readable by `grain.sources.ArrayRecordDataSource`. A record is

    [4-byte little-endian header length][UTF-8 JSON header][image bytes]

with header {"id", "conversations", "image_name"} (image_name None for a text-only record,
which then has no image bytes). The image bytes are the file as it was, unless
`max_side` asked to shrink an image whose longer side exceeds it: that one is resized
(Pillow, BICUBIC, aspect kept) and re-encoded (JPEG at quality 95 if it was a JPEG, else
PNG). index.json's "images" says which ("as_is", or {"max_side", "reencoded"}), and
"has_image" is the records' modality as packed bits (base64), so that grouping by modality
reads no shard.

Records are checked before anything is written, by the same pass and policy as training
(`checks.find_problems` / `checks.enforce`): bad records stop the pack, or with
`skip_bad` are counted and left out. An image that cannot be read while packing is a bad
record too. Shards are written in parallel; each finished one leaves OUT/<shard>.done, so
an interrupted pack run again with the same JSON and settings redoes only unfinished shards
(OUT/plan.json holds those settings, and a run with others is refused).

Paths: the JSON, the images and OUT go through `etils.epath` (gs:// and the other fsspec
schemes, or local); each shard is written to a local temporary file first, as ArrayRecord's
writer opens local files only. Training reads the shards with ArrayRecord's own reader: a
local folder or a gcsfuse mount works; a gs:// path needs an array_record build that reads
GCS itself.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import struct
import tempfile
from typing import Callable

import numpy as np
from etils import epath

from infllava_jax.errors import ConfigError
from infllava_jax.data import checks

FORMAT = "infllava-pack-v1"
INDEX = "index.json"
PLAN = "plan.json"
_HEADER_LEN = struct.Struct("<I")


def shard_name(shard: int, num_shards: int) -> str:
  return f"records-{shard:05d}-of-{num_shards:05d}.array_record"


def encode_record(rid: str, conversations, image_name: str | None, image: bytes) -> bytes:
  """One record: header length, JSON header, image bytes (see the module docstring)."""
  header = json.dumps({"id": rid, "conversations": conversations, "image_name": image_name},
                      ensure_ascii=False).encode("utf-8")
  return _HEADER_LEN.pack(len(header)) + header + image


def decode_record(data: bytes) -> tuple[dict, bytes]:
  """A record → (header dict, image bytes, empty for a text-only record)."""
  (n,) = _HEADER_LEN.unpack_from(data)
  start = _HEADER_LEN.size
  return json.loads(data[start:start + n].decode("utf-8")), data[start + n:]


def shrink(image: bytes, max_side: int) -> bytes | None:
  """The image re-encoded with its longer side at `max_side`, or None if it is no larger."""
  from PIL import Image
  pil = Image.open(io.BytesIO(image))
  if max(pil.size) <= max_side:
    return None
  fmt = "JPEG" if pil.format == "JPEG" else "PNG"
  if fmt == "JPEG" and pil.mode not in ("RGB", "L"):
    pil = pil.convert("RGB")
  pil.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
  out = io.BytesIO()
  pil.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return out.getvalue()


def _write_shard(out: str, shard: int, num_shards: int, records: list[tuple[int, dict]],
                 images: str, max_side: int | None, skip_bad: bool) -> dict:
  """Writes one shard (through a local temporary file, then copied to OUT) and its .done
  marker; returns the marker's content: {"records", "reencoded", "has_image", "bad"}.

  An image that cannot be read: with `skip_bad` the record is left out and listed in
  "bad"; otherwise nothing is written and "bad" holds it (the caller stops)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  out_dir = epath.Path(out)
  name = shard_name(shard, num_shards)
  reencoded, has_image, bad = 0, [], {}
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, name)
    writer = ArrayRecordWriter(local, "group_size:1")
    try:
      for index, raw in records:
        image_name, image = raw.get("image"), b""
        if image_name is not None:
          try:
            image = (epath.Path(images) / image_name).read_bytes()
            smaller = shrink(image, max_side) if max_side else None
          except Exception as e:  # pylint: disable=broad-except  (OSError, PIL's many)
            bad[index] = f"field 'image': cannot read image {image_name!r}: {type(e).__name__}: {e}"
            if not skip_bad:
              return {"bad": bad}
            continue
          if smaller is not None:
            image, reencoded = smaller, reencoded + 1
        writer.write(encode_record(str(raw["id"]), raw["conversations"], image_name, image))
        has_image.append(image_name is not None)
    finally:
      writer.close()
    epath.Path(local).copy(out_dir / name, overwrite=True)
  done = {"records": len(has_image), "reencoded": reencoded,
          "has_image": _bits(has_image), "bad": {str(k): v for k, v in bad.items()}}
  (out_dir / (name + ".done")).write_text(json.dumps(done))
  return done


def _bits(flags) -> str:
  return base64.b64encode(np.packbits(np.asarray(flags, bool)).tobytes()).decode("ascii")


def unbits(text: str, n: int) -> np.ndarray:
  """`_bits` reversed: bool [n]."""
  return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=n).astype(bool)


def _enforce(problems: dict[int, str], records: list, json_path: str, skip_bad: bool) -> str:
  """`checks.enforce` (training's policy and messages), naming the pack's --skip-bad flag."""
  def flag(text):
    return text.replace("set data.skip_bad_samples=True", "pass --skip-bad").replace(
        "data.skip_bad_samples=True", "--skip-bad")
  try:
    return flag(checks.enforce(problems, records, json_path, skip_bad))
  except ConfigError as e:
    raise ConfigError(flag(str(e))) from None


def pack(json_path: str, images: str, out: str, *, num_shards: int = 1,
         max_side: int | None = None, skip_bad: bool = False, template: str = "llama3",
         workers: int = 1, progress: Callable[[str], None] = print) -> dict:
  """Packs `json_path` (+ images under `images`) into `num_shards` shards under `out`;
  returns the index (also written to OUT/index.json). See the module docstring."""
  if num_shards < 1:
    raise ConfigError(f"--shards must be >= 1, got {num_shards}")
  if max_side is not None and max_side < 1:
    raise ConfigError(f"--max-side must be >= 1, got {max_side}")
  records, data = checks.read_records(json_path, "--json")
  sha = hashlib.sha256(data).hexdigest()
  problems = checks.find_problems(records, images, template=template, text_only=False)
  if problems:
    progress(_enforce(problems, records, json_path, skip_bad))
  good = [(i, r) for i, r in enumerate(records) if i not in problems]
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  plan = {"format": FORMAT, "source_sha256": sha, "shards": num_shards, "max_side": max_side,
          "skip_bad": skip_bad, "template": template}
  plan_path = out_dir / PLAN
  if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
    raise ConfigError(f"{plan_path}: {out} holds a pack of another JSON or other settings "
                      f"({plan_path.read_text()}); pack into an empty folder")
  plan_path.write_text(json.dumps(plan))
  bounds = np.linspace(0, len(good), num_shards + 1).astype(int)
  done = {}
  for shard in range(num_shards):
    marker = out_dir / (shard_name(shard, num_shards) + ".done")
    if marker.exists():
      done[shard] = json.loads(marker.read_text())
  if done:
    progress(f"resuming: {len(done)} of {num_shards} shards already written")
  todo = [s for s in range(num_shards) if s not in done]
  with concurrent.futures.ProcessPoolExecutor(max(1, min(workers, len(todo) or 1))) as pool:
    futures = {pool.submit(_write_shard, out, s, num_shards, good[bounds[s]:bounds[s + 1]],
                           images, max_side, skip_bad): s for s in todo}
    for future in concurrent.futures.as_completed(futures):
      shard, result = futures[future], future.result()
      if "records" not in result:
        for other in futures:
          other.cancel()
        bad = {int(k): v for k, v in result["bad"].items()}
        _enforce(bad, records, json_path, skip_bad=False)  # raises
      done[shard] = result
      progress(f"shard {len(done)}/{num_shards} written: {shard_name(shard, num_shards)} "
               f"({result['records']} records)")
  unreadable = {int(k): v for d in done.values() for k, v in d["bad"].items()}
  if unreadable:
    progress(checks.describe(unreadable, records, json_path) + " (skipped: --skip-bad)")
  counts = [done[s]["records"] for s in range(num_shards)]
  has_image = np.concatenate([unbits(done[s]["has_image"], done[s]["records"])
                              for s in range(num_shards)])
  reencoded = sum(d["reencoded"] for d in done.values())
  index = {
      "format": FORMAT, "records": int(sum(counts)),
      "shards": [{"name": shard_name(s, num_shards), "records": int(c)}
                 for s, c in enumerate(counts)],
      "source_json": str(json_path), "source_sha256": sha,
      "images": "as_is" if max_side is None else {"max_side": max_side, "reencoded": reencoded},
      "skipped": len(problems) + len(unreadable), "has_image": _bits(has_image),
  }
  (out_dir / INDEX).write_text(json.dumps(index, indent=1))
  return index
