"""Stopping a run at one step that every process agrees on.

SIGTERM only sets a flag. Every `sync_every` steps the processes gather their flags with
a collective (jax.experimental.multihost_utils) and stop together when any was set, or
when Orbax's own preemption sync point (JAX's coordination service) says so. A process
that stopped on its own would block the others in the next step's collective.
"""
from __future__ import annotations

import signal
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODE = 75        # EX_TEMPFAIL: the run was preempted, rerun the same command to resume


class StopRequest:
  """A context manager turning SIGTERM into a flag; `agreed(step)` is the collective check."""

  def __init__(self, sync_every: int = 1, reached_sync_point: Callable[[int], bool] | None = None):
    self.sync_every = sync_every
    self.reached_sync_point = reached_sync_point
    self.requested = False
    self._previous = None

  def __enter__(self) -> "StopRequest":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:          # not the main thread: only the coordination service's sync
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    """Whether every process stops after `step`: the same answer on every process."""
    if jax.process_count() == 1:
      stop = self.requested
    elif step % self.sync_every:
      return False
    else:
      flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
      stop = bool(np.any(flags))
    if self.reached_sync_point is not None and self.reached_sync_point(step):
      stop = True
    return stop
