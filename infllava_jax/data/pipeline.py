"""The grain input pipeline: source → order → host shard → decode (workers) → pack/pad → batch.

    source ─► shuffle (seeded, reshuffled each epoch) or group by modality
           ─► [process_index::process_count] ─► repeat(num_epochs)
           ─► decode: image + template + tokenise       (grain worker processes)
           ─► screen: count, then skip or raise on bad samples        (main process)
           ─► pad to max_length, or first-fit pack several samples per row
           ─► batch ─► model batch (numpy dict, see `BATCH_KEYS`)

The returned `DataIterator` is checkpointable: `get_state()` is a JSON-able dict and
`set_state()` on a fresh iterator resumes with exactly the batches that would have come next.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict, FrozenConfigDict

from infllava_jax.errors import ConfigError
from infllava_jax.data import anyres, checks, images, sources, templates
from infllava_jax.data.tokenizer import load_tokenizer

# tokens/targets/positions/segment_ids [B, T] int32, loss_mask [B, T] float32,
# pixels [B, M, H, W, 3] float32 (M = images per row: data.max_images_per_row with packing,
# else 1; 0 for a text-only run, data.max_images_per_row=0, which refuses image records);
# for model.variant "llava_next" {"tiles": [B, M, 1 + T, S, S, 3], "layout": [B, M, 4]}
# (`data/anyres.py`), each image with its own number of slots in the tokens.
BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "pixels")
_SEQ_KEYS = ("tokens", "targets", "loss_mask")


class BadSampleError(ConfigError):
  """A record that cannot become a sample, with data.skip_bad_samples=False: a user error
  (the CLI prints its one line and exits 2)."""


@dataclasses.dataclass(frozen=True)
class SampleDecoder(grain.transforms.Map):
  """Record → one sample: {tokens, targets, loss_mask: [L], pixels: [n, S, S, 3]} (n = 0/1).

  Never raises for a bad record: it returns {"error": message} (or {"overlong": message})
  so that the main process counts it and skips or stops, whatever the worker did.
  """
  template: str
  image_token_id: int
  num_image_tokens: int
  image_size: int
  image_aspect: str
  max_length: int
  overlong: str
  double_bos: bool
  tokenizer_path: str | None
  label_rule: str = "reference"
  text_only: bool = False  # data.max_images_per_row=0: an image record is a bad sample
  # The frozen config.model of a llava_next run: images are tiled (`data/anyres.py`) and
  # each gets its own number of slots (`num_image_tokens` is then unused).
  anyres_model: Any = None

  def map(self, record: dict) -> dict:
    if record.get("pad"):  # sources build records without this key
      return {"pad": True}
    where = f"{record.get('origin')}: record {record.get('id')!r}"
    if "error" in record:
      return {"error": f"{where}: {record['error']}"}
    has_image = record["image"] is not None
    if has_image and self.text_only:
      return {"error": f"{where}: field 'image': {checks.TEXT_ONLY_IMAGE}"}
    try:
      num_image_tokens = self.num_image_tokens
      if self.anyres_model is not None:
        pixels, counts = anyres.image_inputs([record["image"]] if has_image else [],
                                             self.anyres_model)
        num_image_tokens = counts[0] if has_image else 0
      elif has_image:
        pixels = images.preprocess(record["image"], self.image_size, self.image_aspect)[None]
      else:
        pixels = np.zeros((0, self.image_size, self.image_size, 3), np.float32)
      tok = templates.tokenize_conversation(
          record["conversations"], has_image=has_image, template=self.template,
          tokenizer=load_tokenizer(self.tokenizer_path), image_token_id=self.image_token_id,
          num_image_tokens=num_image_tokens, max_length=self.max_length,
          overlong=self.overlong, double_bos=self.double_bos, label_rule=self.label_rule)
    except templates.OverlongError as e:
      return {"overlong": f"{where}: overlong: {e}"}
    except (templates.SampleError, images.ImageError) as e:
      field = "image" if isinstance(e, images.ImageError) else "conversations"
      return {"error": f"{where}: field {field!r}: {e}"}
    return {**templates.shift_targets(tok), "pixels": pixels, "truncated": tok.truncated}


class _ScreenIterator(grain.DatasetIterator):
  """Counts samples; skips bad/overlong ones (or raises); counts are part of the state.

  A skipped sample is dropped from the stream, or, given `blank` (a sample with no token),
  replaced by it: the batch then holds an empty, loss-free row in its place, and every
  later sample keeps its slot, which the modality-grouped order needs (a dropped sample
  would shift each later batch across the boundary of its group). That order's padding
  (`PAD_RECORD`) becomes `blank` too, and is not counted.

  `epoch_size` consecutive skips (a whole pass over this host's share without one usable
  sample) raise instead of looping forever on a repeated dataset.
  """

  def __init__(self, parent, skip_bad: bool, epoch_size: int, blank: dict | None):
    super().__init__(parent)
    self._skip_bad = skip_bad
    self._epoch_size = epoch_size
    self._blank = blank
    self.counts = collections.Counter()
    self._skipped_in_row = 0

  def __next__(self):
    while True:
      sample = next(self._parent)
      if "pad" in sample:  # the grouped order's padding: neither a sample nor a skip
        return dict(self._blank)
      if "overlong" in sample:
        self.counts["overlong_dropped"] += 1
      elif "error" in sample:
        if not self._skip_bad:
          raise BadSampleError(sample["error"] + " (set data.skip_bad_samples=True to skip)")
        self.counts["bad_skipped"] += 1
      else:
        self._skipped_in_row = 0
        self.counts["samples"] += 1
        self.counts["truncated"] += int(sample.pop("truncated"))
        return sample
      self._skipped_in_row += 1
      if self._skipped_in_row >= self._epoch_size:
        raise BadSampleError(
            f"{self._skipped_in_row} samples in a row were dropped or skipped, a whole "
            f"epoch of this host's share (counts so far: {dict(self.counts)}): no sample "
            "fits. Raise data.max_length (the image slots count too) or check the data")
      if self._blank is not None:
        return dict(self._blank)

  def get_state(self):
    return {"parent": self._parent.get_state(), "counts": dict(self.counts),
            "skipped_in_row": self._skipped_in_row}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counts = collections.Counter(state["counts"])
    self._skipped_in_row = state.get("skipped_in_row", 0)


class _Screen(grain.IterDataset):

  def __init__(self, parent, skip_bad: bool, epoch_size: int, blank: dict | None):
    super().__init__(parent)
    self._args = skip_bad, epoch_size, blank

  def __iter__(self):
    return _ScreenIterator(self._parent.__iter__(), *self._args)


def _no_images(model) -> Any:
  """A sample's `pixels` holding no image, for `config.model`."""
  from infllava_jax.model.infllava import input_size
  if model.variant == "llava_next":
    return anyres.image_inputs([], model)[0]
  side = input_size(model)
  return np.zeros((0, side, side, 3), np.float32)


def _blank_sample(model) -> dict:
  """A sample of no token and no image: padded, it is a row that takes no part in the loss."""
  return {"tokens": np.zeros(0, np.int32), "targets": np.zeros(0, np.int32),
          "loss_mask": np.zeros(0, np.float32), "pixels": _no_images(model)}


def _pad_images(pixels, images: int):
  """A sample's pixels (an array or a dict of them, leading axis the images, 0 or 1) with
  `images` of them: zeros when it has none."""
  if isinstance(pixels, dict):
    return {k: _pad_images(v, images) for k, v in pixels.items()}
  return pixels if len(pixels) else np.zeros((images, *pixels.shape[1:]), pixels.dtype)


# A record standing for an empty, loss-free row (see `_ModalityGroupedOrder`).
PAD_RECORD = {"pad": True}


class _ModalityGroupedOrder(grain.MapDataset):
  """Per-epoch order in which each run of `group` indices is all-image or all-text.

  Like LLaVA's modality grouping: each modality is shuffled and cut into groups of the
  global batch size, the full groups are shuffled together, and the two leftovers go last
  (together they make the epoch's one mixed batch, as in the reference). The epoch is then
  padded to whole groups with `PAD_RECORD`s, empty rows where the reference's last batch
  would be short, so that every epoch starts on a group boundary.
  """

  def __init__(self, parent, is_image: np.ndarray, group: int, seed: int):
    super().__init__(parent)
    self._is_image, self._group, self._seed = is_image, group, seed

  def __len__(self) -> int:
    return -(-len(self._parent) // self._group) * self._group

  def __str__(self) -> str:
    return f"ModalityGroupedOrder(group={self._group}, seed={self._seed})"

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    groups, leftovers = [], []
    for mask in (self._is_image, ~self._is_image):
      idx = rng.permutation(np.flatnonzero(mask))
      full = len(idx) // self._group * self._group
      groups += np.split(idx[:full], full // self._group) if full else []
      leftovers.append(idx[full:])
    groups = [groups[i] for i in rng.permutation(len(groups))]
    pad = np.full(len(self) - len(self._parent), -1)
    return np.concatenate(groups + leftovers + [pad]).astype(np.int64)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, len(self))
    record = int(self._order(epoch)[i])
    return PAD_RECORD if record < 0 else self._parent[record + epoch * len(self._parent)]


def _pad_sample(sample: dict, length: int, pad_id: int, images: int) -> dict:
  """One unpacked sample padded to `length`, with positions, segment ids and `images`
  (1, or 0 in a text-only run) image slots in pixels."""
  n = len(sample["tokens"])
  out = {}
  for key in _SEQ_KEYS:
    fill = pad_id if key == "tokens" else 0
    out[key] = np.pad(sample[key], (0, length - n), constant_values=fill)
  out["positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(np.int32)
  out["segment_ids"] = (np.arange(length) < n).astype(np.int32)
  out["pixels"] = _pad_images(sample["pixels"], images)
  return out


# grain packs flat dicts of arrays: a llava_next sample's pixels {"tiles", "layout"} travel
# through packing as these keys.
_ANYRES_PACKED = {"tiles": "pixels_tiles", "layout": "pixels_layout"}


def _flat_pixels(sample: dict) -> dict:
  """A llava_next sample with its pixels dict as top-level `_ANYRES_PACKED` keys."""
  out = {k: v for k, v in sample.items() if k != "pixels"}
  out.update({flat: sample["pixels"][k] for k, flat in _ANYRES_PACKED.items()})
  return out


def _from_packed(row: dict) -> dict:
  """grain's packed row (…_segment_ids, …_positions per feature) → the model's keys."""
  pixels = (row["pixels"] if "pixels" in row
            else {k: row[flat] for k, flat in _ANYRES_PACKED.items()})
  return {"tokens": row["tokens"], "targets": row["targets"], "loss_mask": row["loss_mask"],
          "positions": row["tokens_positions"], "segment_ids": row["tokens_segment_ids"],
          "pixels": pixels}


class DataIterator:
  """Batches (numpy dicts, see BATCH_KEYS) with checkpointable state and sample counts."""

  def __init__(self, iterator, screen_of):
    self._it = iterator
    self._screen_of = screen_of

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  @property
  def grain_iterator(self):
    """The underlying grain `DatasetIterator`, for grain's Orbax checkpoint handler."""
    return self._it

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  @property
  def counts(self) -> dict:
    """{"samples", "truncated", "overlong_dropped", "bad_skipped"} seen so far."""
    counts = self._screen_of(self._it).counts
    return {key: counts.get(key, 0)
            for key in ("samples", "truncated", "overlong_dropped", "bad_skipped")}

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close:
      close()


def _find_screen(iterator):
  while not isinstance(iterator, _ScreenIterator):
    iterator = iterator._parent  # pylint: disable=protected-access
  return iterator


def host_batch_size(config: ConfigDict, process_count: int) -> int:
  """Rows each process feeds per step: train.global_batch_size / processes, or, where that
  is None, data.batch_size. Both set must agree; raises ConfigError otherwise."""
  global_batch = config.train.get("global_batch_size")
  per_host = config.data.get("batch_size")
  if global_batch is None:
    if per_host is None:
      raise ConfigError("set train.global_batch_size (rows per step over all processes) or "
                        "data.batch_size (rows per process)")
    return per_host
  if global_batch % process_count:
    raise ConfigError(f"train.global_batch_size {global_batch} does not divide over "
                      f"{process_count} processes")
  if per_host is not None and per_host * process_count != global_batch:
    raise ConfigError(
        f"data.batch_size {per_host} x {process_count} processes disagrees with "
        f"train.global_batch_size {global_batch}: set one of them and the other to None")
  return global_batch // process_count


def make_dataset(config, source, *, process_index: int | None = None,
                 process_count: int | None = None, num_epochs: int | None = None,
                 shuffle: bool | None = None) -> grain.IterDataset:
  """The batched IterDataset for `source` under `config.data` / `config.model`.

  process_index/count default to jax's; num_epochs None repeats forever.
  """
  from infllava_jax.model.infllava import input_size, num_image_tokens
  data, model = config.data, config.model
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  batch_size = host_batch_size(config, process_count)
  shuffle = data.shuffle if shuffle is None else shuffle
  # Configs saved before data.label_rule existed trained with the reference's rule.
  label_rule = data.get("label_rule", "reference")
  if label_rule not in templates.LABEL_RULES:
    raise ConfigError(f"data.label_rule must be one of {templates.LABEL_RULES}, got "
                      f"{label_rule!r}")
  tok = load_tokenizer(data.tokenizer_path)
  ds = grain.MapDataset.source(source)
  if data.group_by_modality:
    if data.packing:
      raise ValueError("data.group_by_modality needs data.packing=False: a packed row holds "
                       "several samples, so batches cannot follow the modality groups")
    is_image = np.array([source.has_image(i) for i in range(len(source))])
    ds = _ModalityGroupedOrder(ds, is_image, batch_size * process_count, data.seed)
  elif shuffle:
    ds = ds.shuffle(seed=data.seed)
  # Records (not padding) in this host's share of an epoch: the padding comes last.
  epoch_size = max(1, len(range(process_index, len(source), process_count)))
  ds = ds[process_index::process_count]
  ds = ds.repeat(num_epochs)
  llava_next = model.variant == "llava_next"
  ds = ds.map(SampleDecoder(
      template=data.template, image_token_id=model.image_token_id,
      num_image_tokens=0 if llava_next else num_image_tokens(model),
      image_size=input_size(model),
      image_aspect=data.image_aspect, max_length=data.max_length, overlong=data.overlong,
      double_bos=data.double_bos, tokenizer_path=data.tokenizer_path,
      label_rule=label_rule,
      text_only=data.max_images_per_row == 0,
      anyres_model=FrozenConfigDict(model) if llava_next else None))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                            prefetch_buffer_size=data.prefetch))
  if data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.worker_count, per_worker_buffer_size=data.worker_buffer_size))
  # Grouped order: a skipped sample leaves an empty row, so batches stay on the groups.
  blank = _blank_sample(model) if data.group_by_modality else None
  it = _Screen(it, data.skip_bad_samples, epoch_size, blank)
  length = data.max_length
  if data.packing:
    image_keys = tuple(_ANYRES_PACKED.values()) if llava_next else ("pixels",)
    if llava_next:
      it = it.map(_flat_pixels)
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": length, "targets": length, "loss_mask": length,
                           **{k: data.max_images_per_row for k in image_keys}},
        num_packing_bins=batch_size, shuffle_bins=False,
        padding_struct={"tokens": tok.pad_token_id, "targets": 0, "loss_mask": 0,
                        **{k: 0 for k in image_keys}})
    it = it.map(_from_packed)
  else:
    it = it.map(functools.partial(_pad_sample, length=length, pad_id=tok.pad_token_id,
                                  images=min(1, data.max_images_per_row)))
  return it.batch(batch_size, drop_remainder=data.drop_remainder)


def make_iterator(config, source=None, split: str = "train", **kwargs) -> DataIterator:
  """A DataIterator over `source` (default: the one config.data names for `split`)."""
  if config.data.worker_count > 0:
    _mark_flags_parsed()
  source = sources.make_source(config.data, split) if source is None else source
  ds = make_dataset(config, source, **kwargs)
  return DataIterator(iter(ds), _find_screen)


def _mark_flags_parsed() -> None:
  """grain's worker processes read absl flags; a library caller may not have parsed them."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
