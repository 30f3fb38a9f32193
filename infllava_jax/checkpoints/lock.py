"""One training run per workdir: an owner file, refreshed while the run lives.

`infllava train` claims WORKDIR/OWNER_FILE before it builds anything: a JSON record of the
run (a run id, host, pid, start time) and a heartbeat time that a background thread
refreshes every `heartbeat_s`. A second start on the same workdir finds a fresh heartbeat
and refuses in one line naming the owner; the first run is not touched.

No file locks: the workdir may be a bucket (gs://), where there are none. A claim writes
the record, waits `settle_s` and reads it back; of two starts at the same moment only the
last writer finds its own run id and goes on. The processes of one multi-process run share
the workdir by design: process 0 claims it and tells the others the outcome.

An owner is stale, and is taken over with a one-line warning, when its heartbeat is older
than `stale_s` (a run killed with -9, a lost VM), or at once when it ran on this host and
its pid is gone. The owner file is removed when the run ends; `rm WORKDIR/OWNER_FILE`
clears one by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from infllava_jax.checkpoints import locate
from infllava_jax.errors import ConfigError

OWNER_FILE = "OWNER.json"
HEARTBEAT_S = 60.0
STALE_S = 300.0  # five missed heartbeats
_MESSAGE_BYTES = 2048


class WorkdirInUseError(ConfigError):
  """Another live run owns the workdir."""


def _now() -> float:
  return time.time()


def _when(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _alive_here(owner: dict) -> bool | None:
  """Whether the owner's pid runs, when it ran on this host; None when it did not."""
  if owner.get("host") != socket.gethostname():
    return None
  try:
    os.kill(int(owner["pid"]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def read_owner(workdir: str | os.PathLike) -> dict | None:
  """The owner record of `workdir`, or None (no file, or one cut short mid-write)."""
  path = locate.absolute(workdir) / OWNER_FILE
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def describe(owner: dict) -> str:
  return (f"host {owner.get('host')}, pid {owner.get('pid')}, started "
          f"{_when(owner.get('started', 0))}, run id {owner.get('run_id')}")


class WorkdirOwner:
  """Claims `workdir` for this run while in a `with` block (see the module docstring).

  Raises WorkdirInUseError on every process when another live run owns it.
  """

  def __init__(self, workdir: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S, settle_s: float = 1.0):
    self.workdir = locate.absolute(workdir)
    self.path = self.workdir / OWNER_FILE
    self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
    self.record = dict(run_id=uuid.uuid4().hex[:12], host=socket.gethostname(),
                       pid=os.getpid(), processes=jax.process_count(), started=_now())
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirOwner":
    refusal = self._claim() if jax.process_index() == 0 else ""
    if jax.process_count() > 1:  # the same outcome on every process
      refusal = _broadcast_text(refusal)
    if refusal:
      raise WorkdirInUseError(refusal)
    if jax.process_index() == 0:
      self._thread = threading.Thread(target=self._beat, name="workdir-owner", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      if self._is_mine(read_owner(self.workdir)):
        self.path.unlink(missing_ok=True)

  def _claim(self) -> str:
    """'' once this run owns the workdir, else the one-line refusal."""
    owner = read_owner(self.workdir)
    if owner is not None and not self._is_mine(owner):
      age = _now() - float(owner.get("heartbeat", 0))
      alive = _alive_here(owner)
      if owner.get("pid") == os.getpid() and alive is not None:
        pass  # this process's own earlier run (in a notebook): not another trainer
      elif alive is False or age > self.stale_s:
        why = "its process is gone" if alive is False else f"no heartbeat for {age:.0f}s"
        locate.warn(f"{self.path}: taking over from a stale owner ({describe(owner)}): {why}")
      else:
        return self._refusal(owner, age)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._write()
    time.sleep(self.settle_s)  # a start racing this one has written by now
    owner = read_owner(self.workdir)
    if owner is not None and not self._is_mine(owner):
      return self._refusal(owner, _now() - float(owner.get("heartbeat", 0)))
    return ""

  def _refusal(self, owner: dict, age: float) -> str:
    return (f"{self.workdir} is in use by another training run ({describe(owner)}; last "
            f"heartbeat {max(age, 0):.0f}s ago). Wait for it to end, or train in another "
            f"--workdir. If that run is gone, its claim lapses {self.stale_s:.0f}s after its "
            f"last heartbeat, or remove {self.path}")

  def _is_mine(self, owner: dict | None) -> bool:
    return owner is not None and owner.get("run_id") == self.record["run_id"]

  def _write(self) -> None:
    self.path.write_text(json.dumps(dict(self.record, heartbeat=_now())))

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      owner = read_owner(self.workdir)
      if owner is None or self._is_mine(owner):
        try:
          self._write()
        except OSError as e:  # a storage hiccup: the next beat tries again
          print(f"warning: {self.path}: heartbeat not written ({e})", file=sys.stderr)


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process."""
  data = np.zeros(_MESSAGE_BYTES, np.uint8)
  raw = text.encode()[:_MESSAGE_BYTES]
  data[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return out.astype(np.uint8).tobytes().rstrip(b"\0").decode(errors="replace")
