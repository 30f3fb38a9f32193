"""The workdir owner file: claim, refusal, heartbeat, stale owners, release."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from infllava_jax.checkpoints import lock


def owner_of(workdir) -> dict:
  return json.loads((workdir / lock.OWNER_FILE).read_text())


def write_owner(workdir, **fields):
  record = dict(run_id="other", host=socket.gethostname(), pid=1, started=time.time(),
                heartbeat=time.time())
  record.update(fields)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / lock.OWNER_FILE).write_text(json.dumps(record))


def dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_claim_heartbeat_and_release(tmp_path):
  with lock.WorkdirOwner(tmp_path / "run", heartbeat_s=0.05, settle_s=0) as owner:
    record = owner_of(tmp_path / "run")
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    first_beat = record["heartbeat"]
    time.sleep(0.3)
    assert owner_of(tmp_path / "run")["heartbeat"] > first_beat
    assert owner_of(tmp_path / "run")["run_id"] == owner.record["run_id"]
  assert not (tmp_path / "run" / lock.OWNER_FILE).exists()


def test_a_live_owner_is_refused_in_one_line(tmp_path, capsys):
  # Another host (its pid cannot be checked from here) with a fresh heartbeat.
  write_owner(tmp_path, host="other-host", pid=4242, heartbeat=time.time() - 12)
  with pytest.raises(lock.WorkdirInUseError) as refused:
    with lock.WorkdirOwner(tmp_path, settle_s=0):
      pass
  message = str(refused.value)
  assert "\n" not in message
  assert message.startswith(f"{tmp_path} is in use by another training run (host other-host, "
                            "pid 4242, started ")
  assert "run id other; last heartbeat 12s ago)" in message
  assert owner_of(tmp_path)["run_id"] == "other"  # untouched


@pytest.mark.parametrize("gone, why", [
    ("silent", r"no heartbeat for 100\ds"),  # another host: only its heartbeat tells
    ("exited", r"its process is gone"),      # this host, a pid no longer running
])
def test_a_stale_owner_is_taken_over_with_a_warning(tmp_path, capsys, gone, why):
  if gone == "silent":
    write_owner(tmp_path, host="other-host", heartbeat=time.time() - 1000)
  else:
    write_owner(tmp_path, pid=dead_pid())
  with lock.WorkdirOwner(tmp_path, settle_s=0) as owner:
    assert owner_of(tmp_path)["run_id"] == owner.record["run_id"]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"warning: {tmp_path / lock.OWNER_FILE}: taking "
                                             "over from a stale owner (host ")
  assert re.search(why + "$", err[0]), err


def test_of_two_racing_claims_the_last_writer_wins(tmp_path, monkeypatch):
  """A start that writes while this one settles: this one reads the other's id, refuses."""
  owner = lock.WorkdirOwner(tmp_path, settle_s=0)
  write = owner._write

  def raced():
    write()
    write_owner(tmp_path, host="other-host", pid=4242)

  monkeypatch.setattr(owner, "_write", raced)
  with pytest.raises(lock.WorkdirInUseError, match="host other-host, pid 4242"):
    owner.__enter__()


def test_the_same_process_may_claim_again(tmp_path):
  """A notebook that builds a second run on the workdir after the first (same pid)."""
  first = lock.WorkdirOwner(tmp_path, settle_s=0).__enter__()
  with lock.WorkdirOwner(tmp_path, settle_s=0) as second:
    assert owner_of(tmp_path)["run_id"] == second.record["run_id"]
  first.__exit__(None, None, None)
  assert not (tmp_path / lock.OWNER_FILE).exists()
