"""Stopping a run cleanly when its machines are reclaimed (SIGTERM, then a grace period).

A multi-process run uses JAX's preemption service (started by `jax.distributed.initialize`):
it catches SIGTERM on any process and names one step at which every process stops, which
`multihost_utils.reached_preemption_sync_point` reports (Orbax's
`PreemptionCheckpointingPolicy` saves at that step). A single process has no such service:
a signal handler sets a flag that the loop polls.
"""

from __future__ import annotations

import signal
import threading
from typing import Sequence

import jax
from jax.experimental import multihost_utils


class PreemptionFlag:
  """Whether the run should save and stop, polled once per step with `should_stop(step)`.

  One process: set by SIGTERM (or `signals`); construct it in the main thread (Python's
  rule for signal handlers), `restore()` puts the previous handlers back. Several
  processes: JAX's preemption service answers, the same on every process for a step, and
  no Python handler is installed (it would take SIGTERM away from the service).
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self.signal: int | None = None
    self._service = jax.process_count() > 1
    self._previous = {} if self._service else {
        sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """Whether to save `step` and stop. With several processes, call it at every step on
    every process (the service counts the calls to agree on a step)."""
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
