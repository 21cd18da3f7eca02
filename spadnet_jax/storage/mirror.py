"""TensorBoard events for a workdir in an object store: written locally, uploaded whole.

clu's SummaryWriter writes through TensorFlow's file system, whose GCS client cannot be
pointed anywhere but Google's endpoint and appends to an open file, which an object store
cannot do. So a run whose workdir is a URL writes its events into a local staging folder,
and every file there that grew is uploaded as a whole object (an atomic replacement) at
least every UPLOAD_EVERY_S seconds while metrics are written, at each flush and at close:
a killed run loses at most the events of the last interval; TensorBoard reads the bucket.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Mapping

from clu import metric_writers
from etils import epath

UPLOAD_EVERY_S = 30.0


class MirroredWriter(metric_writers.MetricWriter):
  """A clu writer writing to a local folder, whose files are uploaded to `remote`."""

  def __init__(self, remote: epath.Path, upload_every_s: float = UPLOAD_EVERY_S):
    self.remote = epath.Path(remote)
    self.local = tempfile.mkdtemp(prefix="spadnet-events-")
    self.inner = metric_writers.create_default_writer(self.local)
    self.upload_every_s = upload_every_s
    self._uploaded: dict[str, int] = {}
    self._last = time.monotonic()

  def upload(self) -> None:
    """Upload every local file whose size changed since its last upload."""
    for root, _, names in os.walk(self.local):
      for name in sorted(names):
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        rel = os.path.relpath(path, self.local)
        if self._uploaded.get(rel) != size:
          with open(path, "rb") as f:
            (self.remote / rel).write_bytes(f.read())
          self._uploaded[rel] = size
    self._last = time.monotonic()

  def _wrote(self) -> None:
    if time.monotonic() - self._last >= self.upload_every_s:
      self.flush()

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    self.inner.write_summaries(step, values, metadata)
    self._wrote()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.inner.write_scalars(step, scalars)
    self._wrote()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    self.inner.write_images(step, images)
    self._wrote()

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    self.inner.write_videos(step, videos)
    self._wrote()

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    self.inner.write_audios(step, audios, sample_rate=sample_rate)
    self._wrote()

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self.inner.write_texts(step, texts)
    self._wrote()

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    self.inner.write_histograms(step, arrays, num_buckets)
    self._wrote()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.inner.write_hparams(hparams)
    self._wrote()

  def flush(self) -> None:
    self.inner.flush()
    self.upload()

  def close(self) -> None:
    self.inner.close()
    try:
      self.upload()
    finally:
      shutil.rmtree(self.local, ignore_errors=True)

