"""Checksums of checkpoint steps: what was written, so that a damaged step is named by step
and file and never trusted.

Each finalised step folder holds checksums.json, the size and SHA-256 of every file Orbax
wrote there. Only the standard library is needed, so a program that merely checks a step
(predict's program cache) does not pay for importing Orbax.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from spadnet_jax.storage import files

CHECKSUMS = "checksums.json"


class DamagedCheckpoint(ValueError):
  """A checkpoint step whose files are missing, altered or unreadable."""


def step_folder(directory: str, step: int) -> str:
  """The folder of step `step` under a manager directory."""
  return os.path.join(os.path.abspath(directory), str(step))


def step_of_folder(path: str) -> tuple[str, int] | None:
  """(manager directory, step) when `path` is one step folder (named by its step, with
  'params' inside), else None."""
  path = os.path.abspath(path)
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(base)
  return None


def file_digest(path: str) -> dict[str, Any]:
  """{'size', 'sha256'} of one file, read in blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _file_digests(step_dir: str) -> dict[str, dict[str, Any]]:
  out = {}
  for root, dirs, names in os.walk(step_dir):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if not rel.startswith("checksums."):      # the manifest and its temporary while written
        out[rel] = file_digest(path)
  return out


def step_bytes(directory: str, step: int) -> int:
  """Bytes on disk of one step."""
  return sum(os.path.getsize(os.path.join(r, f))
             for r, _, names in os.walk(step_folder(directory, step)) for f in names)


def is_sealed(directory: str, step: int) -> bool:
  return os.path.isfile(os.path.join(step_folder(directory, step), CHECKSUMS))


def seal(directory: str, step: int) -> None:
  """Write the step's checksums (once Orbax has finalised it; the primary process only)."""
  step_dir = step_folder(directory, step)
  digests = _file_digests(step_dir)
  with files.atomic_path(os.path.join(step_dir, CHECKSUMS)) as tmp, open(tmp, "w") as f:
    json.dump({"step": step, "files": digests}, f, indent=1, sort_keys=True)


def problems(directory: str, step: int) -> list[str] | None:
  """What is wrong with a step's files ([] when intact), or None when it has no checksums."""
  step_dir = step_folder(directory, step)
  manifest = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isdir(step_dir):
    return [f"{step_dir} does not exist"]
  if not os.path.isfile(manifest):
    return None
  try:
    with open(manifest) as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f"{manifest} is unreadable ({e})"]
  found = _file_digests(step_dir)
  out = []
  for rel, want in sorted(expected.items()):
    got = found.get(rel)
    if got is None:
      out.append(f"{os.path.join(step_dir, rel)} is missing")
    elif got["size"] != want["size"]:
      out.append(f"{os.path.join(step_dir, rel)} has {got['size']} bytes, "
                 f"{want['size']} were written")
    elif got["sha256"] != want["sha256"]:
      out.append(f"{os.path.join(step_dir, rel)} does not match its checksum")
  return out


def verify(directory: str, step: int) -> bool:
  """Raise DamagedCheckpoint naming the step and its first bad file; False when the step
  has no checksums to verify against, True when it was verified."""
  found = problems(directory, step)
  if found:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise DamagedCheckpoint(f"checkpoint step {step} is damaged: {found[0]}{more}")
  return found is not None


def sealed_steps(directory: str) -> list[int]:
  """The steps under a manager directory that have checksums (so were finalised), newest
  first; a damaged one is still listed (verify it)."""
  if not os.path.isdir(directory):
    return []
  found = [int(n) for n in os.listdir(directory) if n.isdigit() and is_sealed(directory, int(n))]
  return sorted(found, reverse=True)


def manifest_digest(directory: str, step: int) -> str:
  """SHA-256 of the step's checksums.json: one name for the exact bytes of every file of the
  step (each file's own SHA-256 is in it), for caches derived from the step."""
  with open(os.path.join(step_folder(directory, step), CHECKSUMS), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
