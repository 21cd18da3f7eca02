"""Checksums of checkpoint steps: what was written, so that a damaged step is named by step
and file and never trusted.

Each finalised step folder holds checksums.json, the size and SHA-256 of every file Orbax
wrote there. The folder may be on a disk or in an object store (a gs:// URL); on a disk
only the standard library is needed, so a program that merely checks a step (predict's
program cache) does not pay for importing Orbax.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import IO, Any

from spadnet_jax.storage import files, paths

CHECKSUMS = "checksums.json"


class DamagedCheckpoint(ValueError):
  """A checkpoint step whose files are missing, altered or unreadable."""


def _join(folder: str | os.PathLike[str], *names: str) -> str:
  """A path under `folder`, a URL's scheme kept (no os.path on a URL)."""
  return "/".join([paths.absolute(folder), *names])


def _open(path: str, mode: str = "rb") -> IO[Any]:
  if paths.is_url(path):
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(path).open(mode)
  return open(path, mode)


def _exists(path: str, folder: bool = False) -> bool:
  if paths.is_url(path):
    from etils import epath  # pylint: disable=import-outside-toplevel
    p = epath.Path(path)
    return p.is_dir() if folder else p.exists()
  return os.path.isdir(path) if folder else os.path.isfile(path)


def step_folder(directory: str | os.PathLike[str], step: int) -> str:
  """The folder of step `step` under a manager directory."""
  return _join(directory, str(step))


def step_of_folder(path: str | os.PathLike[str]) -> tuple[str, int] | None:
  """(manager directory, step) when `path` is one step folder (named by its step, with
  'params' inside), else None."""
  path = paths.absolute(path)
  parent, _, base = path.rpartition("/")
  if base.isdigit() and _exists(f"{path}/params", folder=True):
    return parent, int(base)
  return None


def file_digest(path: str | os.PathLike[str]) -> dict[str, Any]:
  """{'size', 'sha256'} of one file, read in blocks."""
  digest, size = hashlib.sha256(), 0
  with _open(os.fspath(path)) as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
      size += len(block)
  return {"size": size, "sha256": digest.hexdigest()}


def _file_digests(step_dir: str) -> dict[str, dict[str, Any]]:
  return {rel: file_digest(f"{step_dir}/{rel}") for rel in paths.list_files(step_dir)
          if not rel.startswith("checksums.")}   # the manifest and its temporary while written


def step_bytes(directory: str | os.PathLike[str], step: int) -> int:
  """Bytes stored of one step."""
  return sum(paths.list_files(step_folder(directory, step)).values())


def is_sealed(directory: str | os.PathLike[str], step: int) -> bool:
  return _exists(_join(step_folder(directory, step), CHECKSUMS))


def seal(directory: str | os.PathLike[str], step: int) -> None:
  """Write the step's checksums (once Orbax has finalised it; the primary process only)."""
  step_dir = step_folder(directory, step)
  files.write_text(_join(step_dir, CHECKSUMS),
                   json.dumps({"step": step, "files": _file_digests(step_dir)}, indent=1,
                              sort_keys=True))


def problems(directory: str | os.PathLike[str], step: int) -> list[str] | None:
  """What is wrong with a step's files ([] when intact), or None when it has no checksums."""
  step_dir = step_folder(directory, step)
  manifest = _join(step_dir, CHECKSUMS)
  if not _exists(step_dir, folder=True):
    return [f"{step_dir} does not exist"]
  if not _exists(manifest):
    return None
  try:
    with _open(manifest, "r") as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f"{manifest} is unreadable ({e})"]
  found = _file_digests(step_dir)
  out = []
  for rel, want in sorted(expected.items()):
    got = found.get(rel)
    where = f"{step_dir}/{rel}"
    if got is None:
      out.append(f"{where} is missing")
    elif got["size"] != want["size"]:
      out.append(f"{where} has {got['size']} bytes, {want['size']} were written")
    elif got["sha256"] != want["sha256"]:
      out.append(f"{where} does not match its checksum")
  return out


def verify(directory: str | os.PathLike[str], step: int) -> bool:
  """Raise DamagedCheckpoint naming the step and its first bad file; False when the step
  has no checksums to verify against, True when it was verified."""
  found = problems(directory, step)
  if found:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise DamagedCheckpoint(f"checkpoint step {step} is damaged: {found[0]}{more}")
  return found is not None


def sealed_steps(directory: str | os.PathLike[str]) -> list[int]:
  """The steps under a manager directory that have checksums (so were finalised), newest
  first; a damaged one is still listed (verify it)."""
  if paths.is_url(directory):      # one listing request
    names = {rel.split("/")[0] for rel in paths.list_files(directory)
             if rel.endswith(f"/{CHECKSUMS}") and rel.count("/") == 1}
  elif os.path.isdir(directory):
    names = {n for n in os.listdir(directory) if n.isdigit() and is_sealed(directory, int(n))}
  else:
    return []
  return sorted((int(n) for n in names if n.isdigit()), reverse=True)


def manifest_digest(directory: str | os.PathLike[str], step: int) -> str:
  """SHA-256 of the step's checksums.json: one name for the exact bytes of every file of the
  step (each file's own SHA-256 is in it), for caches derived from the step."""
  with _open(_join(step_folder(directory, step), CHECKSUMS)) as f:
    return hashlib.sha256(f.read()).hexdigest()
