"""The `array_record` source: records packed by `infllava data pack` (layout in data/pack.py).

data.path is the pack's folder (local or any `etils.epath` path); its index.json names the
shards, their record counts and each record's modality. Records come in the JSON's order
(bad ones left out at pack time), so the pipeline's shuffling, per-process sharding and
checkpointable state work on them exactly as on the LLaVA JSON source.
"""

from __future__ import annotations

import bisect
import json

import numpy as np
from etils import epath

from infllava_jax.errors import ConfigError
from infllava_jax.data import pack


class PackedSource:
  """Random access over a pack's shards: one grain `ArrayRecordDataSource` per shard, so
  that a shard that cannot be read is named in the error."""

  def __init__(self, path: str):
    folder = epath.Path(path)
    index_path = folder / pack.INDEX
    if not index_path.exists():
      raise FileNotFoundError(f"{index_path}: pack index not found (data.path: a folder "
                              "written by `infllava data pack`)")
    try:
      index = json.loads(index_path.read_text())
      if index.get("format") != pack.FORMAT:
        raise ValueError(f"format {index.get('format')!r}, expected {pack.FORMAT!r}")
      self._names = [str(folder / s["name"]) for s in index["shards"]]
      counts = [int(s["records"]) for s in index["shards"]]
      self._has_image = pack.unbits(index["has_image"], int(index["records"]))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{index_path}: not a pack index: {e} (data.path)") from None
    self._path = path
    self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    self._counts = counts
    self._shards = [None] * len(counts)

  def __len__(self) -> int:
    return self._starts[-1]

  def __repr__(self) -> str:
    return f"PackedSource(path={self._path!r}, n={len(self)})"

  def has_image(self, index: int) -> bool:
    return bool(self._has_image[index])

  def _shard(self, shard: int):
    """The shard's reader, opened on first use and checked against the index's count."""
    if self._shards[shard] is None:
      from grain.sources import ArrayRecordDataSource
      name = self._names[shard]
      try:
        reader = ArrayRecordDataSource(name)
        n = len(reader)
      except Exception as e:  # pylint: disable=broad-except  (array_record's C++ errors)
        raise ConfigError(f"{name}: cannot open this ArrayRecord shard (truncated, or not "
                          f"one): {_first_line(e)} (re-run `infllava data pack` into the folder)"
                          ) from None
      if n != self._counts[shard]:
        raise ConfigError(f"{name}: holds {n} records, the pack index says "
                          f"{self._counts[shard]} (re-run `infllava data pack`)")
      self._shards[shard] = reader
    return self._shards[shard]

  def __getitem__(self, index: int) -> dict:
    shard = bisect.bisect_right(self._starts, index) - 1
    name = self._names[shard]
    try:
      data = self._shard(shard)[index - self._starts[shard]]
      header, image = pack.decode_record(data)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{name}: record {index - self._starts[shard]} cannot be read: "
                        f"{_first_line(e)} (a corrupted shard: re-run `infllava data pack`)"
                        ) from None
    return {"id": header["id"], "conversations": header["conversations"],
            "image": image if header["image_name"] is not None else None, "origin": name}

  def __getstate__(self):  # grain workers get a copy: readers reopen there
    return {**self.__dict__, "_shards": [None] * len(self._counts)}


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
