"""Files a run writes: atomic replacement, and the lock that keeps one run per workdir."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yield a temporary path beside `path` (same extension); rename it onto `path` when the
  block succeeds, remove it when the block fails."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp-{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """An exclusive lock on a workdir for one process of a run (fcntl.flock, released by the
  kernel when the process dies, so a killed run never blocks a rerun). The lock file
  names its holder: host, pid and process index."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.path = os.path.join(os.path.abspath(workdir), f".lock.process{process_index}")
    self.process_index = process_index
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      try:
        h = json.loads(holder)
        holder = f"host {h['host']}, pid {h['pid']}, process {h['process']}"
      except (ValueError, KeyError, TypeError):
        pass
      raise WorkdirInUse(f"workdir {os.path.dirname(self.path)} is in use by another run "
                         f"({holder}); wait for it to end or choose another --workdir") from None
    f.seek(0)
    f.truncate()
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "process": self.process_index}, f)
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc: object) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class DiskFull(OSError):
  """No space left on device; the message (errno-free) names the path, and what was
  written before is untouched."""

  def __str__(self) -> str:
    return self.strerror
