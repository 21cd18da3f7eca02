"""Stopping a run at one step that every process agrees on.

SIGTERM only sets a flag. Every `sync_every` steps the processes gather their flags with
a collective (jax.experimental.multihost_utils) and stop together when any was set, or
when Orbax's own preemption sync point (JAX's coordination service) says so. A process
that stopped on its own would block the others in the next step's collective.
"""
from __future__ import annotations

import signal
import threading
import types
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODE = 75        # EX_TEMPFAIL: the run was preempted, rerun the same command to resume


class EarlySignal:
  """A SIGTERM handler for a training program's start-up (imports, jax.distributed,
  reading the config): the signal is remembered, and the StopRequest entered later takes
  it over, so a run preempted while starting exits as preempted instead of dying by signal."""

  def __init__(self):
    self.received = False
    self.previous: Any = signal.SIG_DFL

  def __call__(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    self.received = True

  @classmethod
  def install(cls) -> "EarlySignal":
    """Install a new EarlySignal as the SIGTERM handler (main thread only)."""
    handler = cls()
    if threading.current_thread() is threading.main_thread():
      handler.previous = signal.signal(signal.SIGTERM, handler)
    return handler


class StopRequest:
  """A context manager turning SIGTERM into a flag; `agreed(step)` is the collective check.

  Enter it after jax.distributed.initialize: its Python handler then replaces the one the
  coordination service installs, whose preemption sync point is still consulted. A signal
  an EarlySignal handler received before counts as a request.
  """

  def __init__(self, sync_every: int = 1, reached_sync_point: Callable[[int], bool] | None = None):
    self.sync_every = sync_every
    self.reached_sync_point = reached_sync_point
    self.requested = False
    self._previous = None

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      if isinstance(self._previous, EarlySignal):
        self.requested = self._previous.received
        self._previous = self._previous.previous
      # Restart interrupted system calls: a collective's socket I/O must not see EINTR.
      signal.siginterrupt(signal.SIGTERM, False)
    return self

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    self.requested = True

  def __exit__(self, *exc: object) -> None:
    # After a stop was requested the process is winding down: a second SIGTERM during its
    # teardown must not turn the preempted exit into death by signal, so the flag stays.
    if self._previous is not None and not self.requested:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int, pending: Any = None, sync: bool = False) -> bool:
    """Whether every process stops after `step`: the same answer on every process.

    Call it after every step. The flags are gathered every `sync_every` steps, or now when
    `sync` (every process must then pass it at the same point); `pending`
    (e.g. the train state) is waited for first, so that the flags' collective never runs
    while another program's collectives are in flight. The coordination service's sync
    point (checked every step, as it requires) is the same on every process too.
    """
    stop = self.reached_sync_point is not None and self.reached_sync_point(step)
    if jax.process_count() == 1:
      stop = stop or self.requested
    elif sync or step % self.sync_every == 0:
      jax.block_until_ready(pending)
      flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
      stop = stop or bool(np.any(flags))
    self.requested = self.requested or stop      # stopping: keep the handler (see __exit__)
    return stop
