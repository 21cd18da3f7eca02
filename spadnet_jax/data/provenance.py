"""Where a prepared data set came from, and one builder at a time per data set.

A prepared tfds copy silently outliving a change of its source would train on old data,
so each copy records the settings and a fingerprint of the files it was built from.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Any, Iterator

import ml_collections
import tensorflow_datasets as tfds

RECORD = "provenance.json"


def fingerprint(manual_dir: str | None) -> str | None:
  """A digest of the names, sizes and modification times of every file under manual_dir."""
  if not manual_dir:
    return None
  digest = hashlib.sha256()
  for root, dirs, names in os.walk(manual_dir):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      st = os.stat(path)
      digest.update(f"{os.path.relpath(path, manual_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def describe(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings and source that decide a prepared copy's contents."""
  manual_dir = cfg.manual_dir or None
  out: dict[str, Any] = {"name": cfg.name}
  if cfg.name.startswith("face_folder"):
    out.update(manual_dir=os.path.abspath(manual_dir) if manual_dir else None,
               skip_bad_examples=bool(cfg.skip_bad_examples),
               max_image_pixels=float(cfg.max_image_pixels),
               fingerprint=fingerprint(manual_dir))
  return out


def _record_path(builder: tfds.core.DatasetBuilder) -> str:
  return os.path.join(os.fspath(builder.data_dir), RECORD)


def record(builder: tfds.core.DatasetBuilder, cfg: ml_collections.ConfigDict) -> None:
  with open(_record_path(builder), "w") as f:
    json.dump(describe(cfg), f, indent=2)


def check(builder: tfds.core.DatasetBuilder, cfg: ml_collections.ConfigDict) -> None:
  """Refuse a prepared copy built from another source than this run names.

  A run that names no manual_dir uses the prepared copy as it is.
  """
  if not cfg.manual_dir:
    return
  path = _record_path(builder)
  if not os.path.isfile(path):
    return                                    # prepared before records were kept
  with open(path) as f:
    built = json.load(f)
  wanted = describe(cfg)
  differ = [k for k in wanted if k in built and built[k] != wanted[k]]   # a newer setting passes
  if differ:
    both = "; ".join(f"{k}: built {built.get(k)!r}, now {wanted[k]!r}" for k in differ)
    raise ValueError(
        f"the prepared data set {builder.data_dir} was built from another source ({both}); "
        f"delete that folder to rebuild it, or set config.data.data_dir to another folder")


@contextlib.contextmanager
def build_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """An exclusive file lock for preparing this data set (local and NFS data dirs)."""
  data_dir = os.fspath(builder.data_dir)
  if "://" in data_dir:                       # object stores: no file locks
    yield
    return
  root = os.path.dirname(os.path.dirname(os.path.dirname(data_dir)))   # <root>/name/config/version
  lock_dir = os.path.join(root, ".locks")
  os.makedirs(lock_dir, exist_ok=True)
  name = os.path.relpath(data_dir, root).replace(os.sep, "-")
  with open(os.path.join(lock_dir, f"{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
