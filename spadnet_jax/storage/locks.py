"""One run per workdir: a lock each process of a run holds while it trains.

On a local or network disk it is fcntl.flock, released by the kernel when the process
dies, so a killed run never blocks a rerun. An object store (a gs:// workdir) has no flock
and no rename: there the lock is an object created only if it does not exist yet (fsspec
mode 'x', which gcsfs sends as GCS's ifGenerationMatch=0 precondition: of two processes
creating it at once, exactly one succeeds). It names its holder (host, pid, process index,
a random token) and the time of its last heartbeat, rewritten every HEARTBEAT_S seconds
by a thread. A lock whose holder is gone is taken over: at once where the holder ran on
this host and its pid is dead (a rerun after kill -9), after STALE_S seconds without a
heartbeat otherwise (a preempted host of a pod). The takeover deletes the stale object
only if it is still the generation that was read (ifGenerationMatch), so two processes
taking over at once cannot both win; the holder reads its token back after creating it.
A run that ends, or is stopped by SIGTERM, deletes its lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from spadnet_jax.storage import paths

if TYPE_CHECKING:
  from etils import epath

HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir."""


def _lock_name(process_index: int) -> str:
  return f".lock.process{process_index}"


def describe(holder: Any) -> str:
  """A lock holder as a person reads it."""
  try:
    return f"host {holder['host']}, pid {holder['pid']}, process {holder['process']}"
  except (KeyError, TypeError):
    return str(holder) or "unknown"


def _in_use(workdir: str, holder: Any, extra: str = "") -> WorkdirInUse:
  return WorkdirInUse(f"workdir {workdir} is in use by another run ({describe(holder)}{extra}); "
                      "wait for it to end or choose another --workdir")


class FileLock:
  """flock on <workdir>/.lock.process<i> (local and network disks)."""

  def __init__(self, workdir: epath.Path, process_index: int = 0):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, _lock_name(process_index))
    self.process_index = process_index
    self._file = None
    self.took_over: dict[str, Any] | None = None   # always None: the kernel frees a dead holder

  def __enter__(self) -> "FileLock":
    os.makedirs(self.workdir, exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      text = f.read().strip()
      f.close()
      try:
        holder: Any = json.loads(text)
      except ValueError:
        holder = text
      raise _in_use(self.workdir, holder) from None
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


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, TypeError):
    return True
  return True


class ObjectLock:
  """A lock object in an object store (see the module docstring)."""

  def __init__(self, workdir: epath.Path, process_index: int = 0, *,
               heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.workdir = os.fspath(workdir)
    self.url = f"{self.workdir}/{_lock_name(process_index)}"
    self.fs, self.key = paths.filesystem(self.url)
    self.process_index = process_index
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.token = secrets.token_hex(16)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.took_over: dict[str, Any] | None = None

  def _record(self) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "process": self.process_index, "token": self.token,
                       "heartbeat": time.time()}).encode()

  def _read(self) -> tuple[Any, str | None]:
    """(holder record or None, generation or None) of the lock object as it is now."""
    self.fs.invalidate_cache(self.key)
    try:
      info = self.fs.info(self.key)
      data = self.fs.cat_file(self.key)
    except FileNotFoundError:
      return None, None
    try:
      holder = json.loads(data)
    except ValueError:
      holder = {"unreadable": data[:100].decode("utf-8", "replace")}
    return holder, (str(info["generation"]) if info.get("generation") else None)

  def _stale(self, holder: Any) -> bool:
    if not isinstance(holder, dict) or "heartbeat" not in holder:
      return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      if not _pid_alive(holder["pid"]):
        return True
    return time.time() - float(holder["heartbeat"]) > self.stale_s

  def _delete(self, generation: str | None) -> None:
    """Delete the lock object, only if it is still `generation` where the store can say."""
    if generation is not None and hasattr(self.fs, "call"):
      bucket, key, _ = self.fs.split_path(self.key)
      try:
        self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
      except FileNotFoundError:         # already gone
        pass
      self.fs.invalidate_cache(self.key)
    else:
      self.fs.rm_file(self.key)

  def _create(self) -> None:
    with self.fs.open(self.key, "xb") as f:
      f.write(self._record())

  def __enter__(self) -> "ObjectLock":
    # Read first, then create with the precondition: stores that ignore preconditions (the
    # test servers) still refuse a second run; on GCS the precondition closes the gap.
    for _ in range(3):
      holder, generation = self._read()
      if holder is not None:
        if not self._stale(holder):
          age = time.time() - float(holder.get("heartbeat", 0)) if isinstance(holder, dict) else 0
          raise _in_use(self.workdir, holder, f", heartbeat {age:.0f} s ago")
        try:
          self._delete(generation)
        except FileExistsError:       # another process took it over first
          continue
        self.took_over = holder
      try:
        self._create()
        break
      except FileExistsError:
        continue
    else:
      raise _in_use(self.workdir, self._read()[0])
    holder, _ = self._read()
    if not isinstance(holder, dict) or holder.get("token") != self.token:
      raise _in_use(self.workdir, holder)
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder, _ = self._read()
        if not isinstance(holder, dict) or holder.get("token") != self.token:
          return                        # taken over: the run's next write will say so
        self.fs.pipe_file(self.key, self._record())
      except Exception:  # pylint: disable=broad-except  # a missed heartbeat is retried
        continue

  def __exit__(self, *exc: object) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      holder, generation = self._read()
      if isinstance(holder, dict) and holder.get("token") == self.token:
        self._delete(generation)
    except Exception:  # pylint: disable=broad-except  # left behind, it goes stale
      pass


def workdir_lock(workdir: epath.Path, process_index: int = 0) -> FileLock | ObjectLock:
  """The lock of one process of a run on `workdir` (a context manager): flock on a disk, a
  lock object in an object store."""
  if paths.is_url(workdir):
    return ObjectLock(workdir, process_index)
  return FileLock(workdir, process_index)
