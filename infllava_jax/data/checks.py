"""The metadata pass over a LLaVA JSON's records, run before anything compiles.

Each record is checked as the decoder would check it, short of decoding: that it is an
object with "id" and "conversations", that "image" is a path string, that the conversation
has the roles and `<image>` placeholders `templates.check_conversation` requires, and,
where the images are on a local disk, that each image file exists (one directory listing
per folder, not one `stat` per file). What it cannot see (an image that does not decode, a
sample longer than data.max_length) is still found as the sample is read, under the same
data.skip_bad_samples policy.

`find_problems` returns {record index: message}; `enforce` turns them into one line: a
ConfigError (the run stops, exit 2) or, with data.skip_bad_samples, a count to log.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from etils import epath

from infllava_jax.errors import ConfigError
from infllava_jax.data import templates

# Bad records a ConfigError or the skip line names (the count covers all of them).
SHOWN = 3
TEXT_ONLY_IMAGE = "the record has an image but data.max_images_per_row=0 (a text-only run)"


class _FolderListing:
  """Whether files exist, from one `os.listdir` per folder (cached): 665K images in a few
  folders cost a few listings instead of 665K `stat` calls."""

  def __init__(self):
    self._names: dict[str, frozenset[str]] = {}

  def exists(self, root: str, relative: str) -> bool:
    """Whether `os.path.join(root, relative)` is in its folder's listing."""
    folder, _, name = relative.rpartition("/")
    if folder not in self._names:
      try:
        self._names[folder] = frozenset(os.listdir(os.path.join(root, folder) or "."))
      except OSError:  # a missing folder, or not one
        self._names[folder] = frozenset()
    return name in self._names[folder]


def read_records(json_path: str, flag: str) -> tuple[list, bytes]:
  """(records, the file's bytes) of a LLaVA JSON file, local or on a bucket (etils.epath);
  one-line errors name `flag`, the setting that gave the path."""
  path = epath.Path(json_path)
  if not path.exists():
    raise FileNotFoundError(f"{json_path}: LLaVA JSON file not found ({flag})")
  data = path.read_bytes()
  try:
    records = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{json_path}: not valid JSON: {e} ({flag})") from None
  if not isinstance(records, list):
    raise ConfigError(f"{json_path}: expected a JSON list of records, got "
                      f"{type(records).__name__} ({flag})")
  return records, data


def is_local(path: str) -> bool:
  """A path on this machine's file system (not a bucket URL such as gs://...)."""
  return "://" not in path


def record_problem(raw, image_folder: str, *, template: str, text_only: bool,
                   listing: _FolderListing | None) -> str | None:
  """What is wrong with one raw JSON record, or None. `listing` None: no file checks."""
  if not isinstance(raw, dict):
    return f"malformed record: the record is a {type(raw).__name__}, not an object"
  if "id" not in raw:
    return "malformed record: field 'id' missing"
  if "conversations" not in raw:
    return "malformed record: field 'conversations' missing"
  image = raw.get("image")
  if image is not None and not isinstance(image, str):
    return f"malformed record: field 'image' must be a path string, got {type(image).__name__}"
  if image is not None and text_only:
    return f"field 'image': {TEXT_ONLY_IMAGE}"
  try:
    templates.check_conversation(raw["conversations"], image is not None)
  except templates.SampleError as e:
    return f"field 'conversations': {e}"
  if template == "plain" and image is None:
    return "field 'conversations': the plain template needs an image sample"
  if image is not None and listing is not None and not listing.exists(image_folder, image):
    return f"field 'image': image file {os.path.join(image_folder, image)!r} not found"
  return None


def find_problems(records: Sequence, image_folder: str, *, template: str,
                  text_only: bool) -> dict[int, str]:
  """{index: message} for every bad record; image files are looked for when
  `image_folder` is local (on a bucket they are found as they are read)."""
  listing = _FolderListing() if is_local(image_folder) else None
  problems = {}
  for index, raw in enumerate(records):
    problem = record_problem(raw, image_folder, template=template, text_only=text_only,
                             listing=listing)
    if problem is not None:
      problems[index] = problem
  return problems


def describe(problems: dict[int, str], records: Sequence, origin: str) -> str:
  """One line: how many records are bad and the first `SHOWN` of them, by index and id."""
  shown = []
  for index in sorted(problems)[:SHOWN]:
    raw = records[index]
    rid = f" (id {str(raw['id'])!r})" if isinstance(raw, dict) and "id" in raw else ""
    shown.append(f"record #{index}{rid}: {problems[index]}")
  more = f"; {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
  return (f"{origin}: {len(problems)} of {len(records)} records are bad: "
          + "; ".join(shown) + more)


def enforce(problems: dict[int, str], records: Sequence, origin: str, skip_bad: bool) -> str:
  """Raises ConfigError naming the bad records, unless `skip_bad` and some record is good;
  returns the line to log."""
  line = describe(problems, records, origin)
  if not skip_bad:
    raise ConfigError(f"{line} (fix them, or set data.skip_bad_samples=True to skip them)")
  if len(problems) == len(records):
    raise ConfigError(f"{line}: no record to train on")
  return f"{line} (skipped: data.skip_bad_samples=True)"
