"""Prepared data sets kept in an object store (config.data.data_dir = gs://bucket/data),
read from a local copy.

array_record, the format grain reads, opens local files only: neither its writer nor its
reader reaches a bucket. So a data set whose data_dir is a URL is prepared (or copied) in
a local folder under the per-user cache, keyed by the URL, and the bucket holds the
prepared copy that every host of a pod (and every later run) starts from:
- present in the bucket, absent or different locally: its files are downloaded into a
  temporary folder that is then renamed into place (a killed download leaves nothing);
- absent from the bucket: it is built locally as on a disk, then uploaded file by file,
  dataset_info.json last: tfds takes a version folder with that file as prepared, so the
  upload is published only when whole. Two hosts building at once upload the same files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from spadnet_jax import compile_cache
from spadnet_jax.storage import paths

PUBLISHED = "dataset_info.json"     # tfds's mark of a prepared version folder


def local_data_dir(url: str) -> str:
  """The local data_dir standing for `url`: data/<digest of the URL> in the cache root."""
  digest = hashlib.sha256(paths.absolute(url).encode()).hexdigest()[:16]
  return os.path.join(compile_cache.cache_root(os.environ), "data", digest)


def _remote_version(url: str, local_root: str, version_dir: str) -> str:
  return "/".join([paths.absolute(url), os.path.relpath(version_dir, local_root)])


def fetch(url: str, local_root: str, version_dir: str) -> bool:
  """Download the bucket's prepared copy of `version_dir` when the local one is missing or
  differs (by dataset_info.json); returns whether the bucket holds a prepared copy."""
  remote = _remote_version(url, local_root, version_dir)
  fs, root = paths.filesystem(remote)
  if not fs.exists(f"{root}/{PUBLISHED}"):
    return False
  local_info = os.path.join(version_dir, PUBLISHED)
  if os.path.isfile(local_info):
    with open(local_info, "rb") as f:
      if f.read() == fs.cat_file(f"{root}/{PUBLISHED}"):
        return True
  parent = os.path.dirname(version_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
  try:
    for rel in paths.list_files(remote):      # streamed: shards may be gigabytes
      target = os.path.join(tmp, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      fs.get_file(f"{root}/{rel}", target)
    if os.path.isdir(version_dir):
      shutil.rmtree(version_dir)
    os.replace(tmp, version_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return True


def publish(url: str, local_root: str, version_dir: str) -> None:
  """Upload a locally prepared version folder to the bucket, dataset_info.json last."""
  fs, root = paths.filesystem(_remote_version(url, local_root, version_dir))
  names = sorted(paths.list_files(version_dir), key=lambda rel: rel == PUBLISHED)
  for rel in names:                           # streamed, each a whole-object write
    fs.put_file(os.path.join(version_dir, rel), f"{root}/{rel}")
