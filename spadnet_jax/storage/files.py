"""Files a run writes, whole or not at all, on a disk or in an object store.

On a disk a file is written to a temporary name beside it and renamed over it. An object
store has no rename, but a whole-object write is atomic there (GCS publishes an object when
its upload completes): the file is written to a local temporary file and then uploaded in
one write. Readers never see half a file either way.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from spadnet_jax.storage import paths


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yield a local temporary path to write (same extension as `path`); when the block
  succeeds it replaces `path` (renamed on a disk, uploaded whole to an object store);
  when the block fails it is removed and `path` is untouched."""
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  if paths.is_url(path):
    fd, tmp = tempfile.mkstemp(suffix=ext, prefix="spadnet-upload-")
    os.close(fd)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
  try:
    yield tmp
    if paths.is_url(path):
      from etils import epath  # pylint: disable=import-outside-toplevel
      with open(tmp, "rb") as f:
        epath.Path(path).write_bytes(f.read())
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
  """Replace the file at `path` with `text`, atomically (atomic_path)."""
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    f.write(text)


class DiskFull(OSError):
  """No space left on device; the message (errno-free) names the path, and what was
  written before is untouched."""

  def __str__(self) -> str:
    return self.strerror
