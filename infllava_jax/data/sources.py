"""Random-access record sources: LLaVA JSON + image folder, TFDS (array_record), synthetic,
and the shards of `infllava data pack` (data/packed.py).

Every source yields the same record form, read lazily and decoded later in the grain
workers:

    {"id": str, "conversations": list | None, "image": None | path | bytes | uint8 array,
     "origin": str (the file or dataset, for error messages), "error": str (only when the
     record itself is malformed; the pipeline reports or skips it)}

Sources have a deterministic `__repr__` (grain checks it when restoring iterator state)
and `has_image(i)`, which tells the modality without decoding (for grouping by modality).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from typing import Sequence

import numpy as np

from infllava_jax.errors import ConfigError
from infllava_jax.data import checks, synthetic

class LlavaJsonSource:
  """A LLaVA JSON file (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json...).

  A list of {"id", optional "image" (path relative to `image_folder`), "conversations"}.
  The file must parse as a JSON list (else ConfigError). The records' metadata is checked
  once, on load (`checks.find_problems`, for `template` and `text_only` =
  data.max_images_per_row == 0): `problems` maps each bad record's index to its message,
  and that record reads as one with an "error", so that it can be counted and skipped.
  """

  def __init__(self, json_path: str, image_folder: str, *, template: str = "llama3",
               text_only: bool = False):
    records, _ = checks.read_records(json_path, "data.json_path")
    self._records = records
    self._json_path = json_path
    self._image_folder = image_folder
    self.problems = checks.find_problems(records, image_folder, template=template,
                                         text_only=text_only)

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return (f"LlavaJsonSource(json_path={self._json_path!r}, "
            f"image_folder={self._image_folder!r}, n={len(self)})")

  def has_image(self, index: int) -> bool:
    record = self._records[index]
    return isinstance(record, dict) and record.get("image") is not None

  def check(self, skip_bad: bool) -> None:
    """Stops on the bad records found on load (ConfigError, one line naming the first few),
    or, with `skip_bad`, logs their count: the pipeline then skips them as they come."""
    if self.problems:
      logging.getLogger(__name__).warning(
          checks.enforce(self.problems, self._records, self._json_path, skip_bad))

  def __getitem__(self, index: int) -> dict:
    raw = self._records[index]
    out = {"id": f"#{index}", "conversations": None, "image": None, "origin": self._json_path}
    if isinstance(raw, dict):
      out["id"] = str(raw.get("id", f"#{index}"))
    if index in self.problems:
      return {**out, "error": self.problems[index]}
    image = raw.get("image")
    out["conversations"] = raw["conversations"]
    out["image"] = None if image is None else os.path.join(self._image_folder, image)
    return out


class TfdsSource:
  """A TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow).

  Features: "id" (text), "conversations" (text, the LLaVA list as JSON) and "image"
  (encoded bytes, empty for text-only records, or a decoded uint8 array). `name` is a
  registered dataset name, or a prepared folder (…/name/version) for builder_from_directory.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds
    if os.path.isdir(name):
      self._ds = tfds.builder_from_directory(name).as_data_source(split=split)
    else:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    self._name, self._split = name, split

  def __len__(self) -> int:
    return len(self._ds)

  def __repr__(self) -> str:
    return f"TfdsSource(name={self._name!r}, split={self._split!r}, n={len(self)})"

  def has_image(self, index: int) -> bool:
    return _has_bytes(self._ds[index].get("image"))

  def __getitem__(self, index: int) -> dict:
    raw = self._ds[index]
    origin = f"{self._name}[{self._split}]"
    rid = _text(raw.get("id", f"#{index}"))
    out = {"id": rid, "conversations": None, "image": None, "origin": origin}
    try:
      out["conversations"] = json.loads(_text(raw["conversations"]))
    except (KeyError, json.JSONDecodeError) as e:
      return {**out, "error": f"malformed record: field 'conversations' is not a JSON list: {e}"}
    image = raw.get("image")
    out["image"] = image if _has_bytes(image) else None
    return out


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _has_bytes(image) -> bool:
  return image is not None and (not isinstance(image, (bytes, np.ndarray)) or len(image) > 0)


class SyntheticSource:
  """The synthetic fine-detail set (see synthetic.py), generated on access."""

  def __init__(self, split: str, num: int, seed: int, image_size: int, max_turns: int = 1,
               kinds: Sequence[str] = synthetic.DEFAULT_KINDS):
    self._args = (split, seed, image_size, max_turns, synthetic.check_kinds(kinds))
    self._num = num

  def __len__(self) -> int:
    return self._num

  def __repr__(self) -> str:
    split, seed, image_size, max_turns, kinds = self._args
    return (f"SyntheticSource(split={split!r}, num={self._num}, seed={seed}, "
            f"image_size={image_size}, max_turns={max_turns}, kinds={kinds})")

  def has_image(self, index: int) -> bool:
    return True

  def __getitem__(self, index: int) -> dict:
    split, seed, image_size, max_turns, kinds = self._args
    record = synthetic.synthetic_example(split, seed, index, image_size, max_turns, kinds)
    return {"id": record["id"], "conversations": record["conversations"],
            "image": record["image"], "origin": repr(self)}


def make_source(data_cfg, split: str = "train"):
  """The source that `data_cfg.source` names ("synthetic", "llava_json", "tfds" or
  "array_record": data.path, a folder `infllava data pack` wrote).

  A LLaVA JSON's records are checked here (`LlavaJsonSource.check`): bad ones stop the run
  (ConfigError) or are counted and skipped, before any model is built or compiled.
  """
  kind = data_cfg.source
  if kind == "synthetic":
    syn = data_cfg.synthetic
    num = syn.num_train if split == "train" else syn.num_heldout
    return SyntheticSource(split, num, syn.seed, syn.image_size, syn.max_turns, syn.kinds)
  if kind == "llava_json":  # checked here, before a model is built or compiled
    source = LlavaJsonSource(data_cfg.json_path, data_cfg.image_folder,
                             template=data_cfg.template,
                             text_only=data_cfg.max_images_per_row == 0)
    source.check(data_cfg.skip_bad_samples)
    return source
  if kind == "tfds":
    return TfdsSource(data_cfg.tfds_name, split, data_cfg.tfds_data_dir or None)
  if kind == "array_record":  # checked when packed (`infllava data pack`)
    from infllava_jax.data.packed import PackedSource
    return PackedSource(data_cfg.path)
  raise ConfigError(f"data.source must be 'synthetic', 'llava_json', 'tfds' or "
                    f"'array_record', got {kind!r}")


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _make_builder():
  """The TFDS builder class, defined lazily so importing this module does not load tfds."""
  import tensorflow_datasets as tfds

  class SyntheticDetail(tfds.core.GeneratorBasedBuilder):
    """Synthetic fine-detail VQA records; `splits` maps split → record iterator factory."""
    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to look for next to the code (tfds would need importlib_resources).
    code_path = None
    splits: dict = {}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(),
          "conversations": tfds.features.Text(),
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      }))

    def _split_generators(self, dl_manager):
      return {name: self._generate_examples(name) for name in self.splits}

    def _generate_examples(self, split):
      for record in self.splits[split]():
        yield record["id"], {"id": record["id"], "image": _png(record["image"]),
                             "conversations": json.dumps(record["conversations"])}

  return SyntheticDetail


def write_synthetic(out: str, splits: dict[str, int], seed: int, image_size: int,
                    max_turns: int = 1, kinds: Sequence[str] = synthetic.DEFAULT_KINDS,
                    progress=print) -> dict[str, str]:
  """Writes the synthetic set as LLaVA JSON + PNGs and as a TFDS array_record dataset.

  Layout: OUT/<split>.json with image paths relative to OUT/images, OUT/images/<split>/*.png,
  and OUT/tfds/synthetic_detail/1.0.0 (read it with data.source="tfds",
  data.tfds_name=that folder). Returns {what: path}.
  """
  os.makedirs(out, exist_ok=True)
  written = {}
  for split, num in splits.items():
    folder = os.path.join(out, "images", split)
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, record in enumerate(synthetic.synthetic_examples(split, num, seed, image_size,
                                                            max_turns, kinds)):
      rel = os.path.join(split, record["id"] + ".png")
      with open(os.path.join(out, "images", rel), "wb") as f:
        f.write(_png(record["image"]))
      records.append({"id": record["id"], "image": rel,
                      "conversations": record["conversations"]})
      if (i + 1) % max(1, num // 10) == 0 or i + 1 == num:
        progress(f"[{split}] {i + 1}/{num} images")
    path = os.path.join(out, f"{split}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(records, f, indent=1)
    written[f"{split}.json"] = path
  builder_cls = _make_builder()
  builder_cls.splits = {
      split: (lambda s=split, n=num: synthetic.synthetic_examples(s, n, seed, image_size,
                                                                  max_turns, kinds))
      for split, num in splits.items()}
  builder = builder_cls(data_dir=os.path.join(out, "tfds"), file_format="array_record")
  # Rewrite, as the JSON above is: tfds would otherwise keep a set an earlier call prepared
  # here (other kinds, seed or counts) and the two formats would disagree.
  import tensorflow_datasets as tfds
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
  written["tfds"] = builder.data_dir
  progress(f"array_record dataset: {builder.data_dir}")
  return written
