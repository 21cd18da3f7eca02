"""predict's programs, kept per checkpoint: the exported SR function and its weights.

A fresh predict process otherwise pays, before its first image, for importing Flax and
Orbax, restoring the checkpoint, tracing the model and lowering it (several seconds for the
paper's x8 model); JAX's persistent compilation cache (compile_cache) only skips the XLA
compilation after all that. Here the first call for a checkpoint stores, in
programs/KEY/ under compile_cache.cache_root():
  program.jaxexport - the SR function exported with the weights as an argument (exported.py);
  weights.npz       - the checkpoint's variables;
  model.json        - its model configuration (SPADNet fields) and step;
  manifest.json     - size and SHA-256 of those three files.
Later calls verify the checkpoint step against its own checksums (so a damaged or edited
checkpoint is still detected) and load these instead: jax and NumPy suffice.

KEY names everything the program depends on: the step's checksum manifest (the exact bytes
of every checkpoint file), the source of the model and its ops, the jax and jaxlib versions
and the platform. A new checkpoint, an upgrade or an edited layer therefore never meets a
stale entry. An entry is written to a temporary folder and renamed into place (processes
may share the cache: the first rename wins, the others drop theirs); one that fails its
manifest is deleted and rebuilt. At most MAX_ENTRIES are kept, the least recently used
removed first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

import spadnet_jax
from spadnet_jax import compile_cache
from spadnet_jax.serving import exported
from spadnet_jax.storage import checksums, paths
from spadnet_jax.untrusted import arrays

FORMAT = 1
MAX_ENTRIES = 8
STALE_TEMPORARY_S = 3600.0    # a temporary entry folder this old was left by a dead process
FILES = ("program.jaxexport", "weights.npz", "model.json")
_SOURCES = ("models", "ops")     # the packages whose code the exported program is made from
Report = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Program:
  """A checkpoint ready to run: (variables, images) -> SR images, and where it came from."""
  call: Callable[[Any, Any], Any]
  variables: Any
  model_config: dict[str, Any]
  step: int
  cached: bool          # loaded from the cache (True) or built from the checkpoint now


def programs_dir() -> str:
  return os.path.join(compile_cache.cache_root(os.environ), "programs")


def source_digest() -> str:
  """SHA-256 of the code the exported program is traced from (models/, ops/, exported.py)."""
  root = os.path.dirname(os.path.abspath(spadnet_jax.__file__))
  paths = [os.path.join(root, "serving", "exported.py")]
  for pkg in _SOURCES:
    for folder, dirs, names in os.walk(os.path.join(root, pkg)):
      dirs.sort()
      paths += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      digest.update(os.path.relpath(path, root).encode() + b"\0" + f.read() + b"\0")
  return digest.hexdigest()


def step_of(path: str) -> tuple[str, int] | None:
  """(manager directory, step) that load_model would choose for `path`, when that step has
  checksums and they verify; None otherwise (no checksums, damaged, or not a checkpoint:
  load_model then reports or refuses it as it always does)."""
  path = paths.absolute(path)
  one_step = checksums.step_of_folder(path)
  if one_step:
    directory, step = one_step
  elif paths.is_url(path):
    numbered = checksums.sealed_steps(path)
    if not numbered:
      return None
    directory, step = path, numbered[0]
  elif os.path.isdir(path):
    numbered = sorted((int(n) for n in os.listdir(path) if n.isdigit()), reverse=True)
    if not numbered:
      return None
    directory, step = path, numbered[0]
  else:
    return None
  if not checksums.is_sealed(directory, step) or checksums.problems(directory, step):
    return None
  return directory, step


def entry_key(directory: str, step: int) -> str:
  """The cache key of a verified checkpoint step on this platform (see the module doc)."""
  parts = {"format": FORMAT, "checkpoint": checksums.manifest_digest(directory, step),
           "source": source_digest(), "jax": jax.__version__,
           "jaxlib": jax.lib.__version__, "platform": jax.default_backend()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_entry(folder: str) -> Program | None:
  """The program stored in `folder`, or None (the folder deleted) when any file is
  missing or differs from its manifest."""
  try:
    with open(os.path.join(folder, "manifest.json")) as f:
      manifest = json.load(f)
    if any(checksums.file_digest(os.path.join(folder, n)) != manifest["files"][n] for n in FILES):
      raise ValueError("a file differs from the manifest")
    with open(os.path.join(folder, "model.json")) as f:
      meta = json.load(f)
    with open(os.path.join(folder, "program.jaxexport"), "rb") as f:
      program = jax.export.deserialize(bytearray(f.read()))
    variables = exported.nested_variables(arrays.load_npz(os.path.join(folder, "weights.npz")))
  except (OSError, ValueError, KeyError, TypeError):
    shutil.rmtree(folder, ignore_errors=True)
    return None
  os.utime(folder)          # most recently used
  return Program(program.call, variables, meta["model"], meta["step"], cached=True)


def store_entry(folder: str, program: jax.export.Exported, variables: Any,
                model_config: dict[str, Any], step: int) -> None:
  """Write an entry atomically (a temporary folder renamed); another process's entry for
  the same key, already in place, is kept. Old entries beyond MAX_ENTRIES are removed.

  Args:
    folder: the entry, programs_dir()/KEY.
    program: the exported SR function (exported.export_sr).
    variables: its weights (host arrays).
    model_config: the SPADNet fields, as stored with the checkpoint.
    step: the checkpoint step they came from.
  """
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".writing-", dir=parent)
  try:
    with open(os.path.join(tmp, "program.jaxexport"), "wb") as f:
      f.write(program.serialize())
    np.savez(os.path.join(tmp, "weights.npz"), **exported.flat_variables(variables))
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump({"model": model_config, "step": step}, f)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump({"files": {n: checksums.file_digest(os.path.join(tmp, n)) for n in FILES}}, f)
    os.rename(tmp, folder)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)   # another process's entry won, or no room: no cache
    return
  prune(parent, MAX_ENTRIES)


def prune(parent: str, keep: int, stale_s: float = STALE_TEMPORARY_S) -> None:
  """Remove all but the `keep` most recently used entries, and temporaries older than
  `stale_s` (left by a process that died while writing; a younger one may still be written)."""
  now = time.time()
  names = os.listdir(parent)
  for name in names:
    path = os.path.join(parent, name)
    if name.startswith(".writing-") and now - os.path.getmtime(path) > stale_s:
      shutil.rmtree(path, ignore_errors=True)
  entries = [os.path.join(parent, n) for n in names if not n.startswith(".")]
  entries.sort(key=os.path.getmtime, reverse=True)
  for old in entries[keep:]:
    shutil.rmtree(old, ignore_errors=True)


def load(path: str, report: Report = print) -> Program:
  """The checkpoint at `path` as a Program: from the cache when its step verifies and an
  entry exists, else restored with checkpoint.load_model (which reports or refuses damaged
  steps), exported, and stored for the next call when the step has checksums."""
  found = step_of(path)
  folder = os.path.join(programs_dir(), entry_key(*found)) if found else None
  if folder and os.path.isdir(folder):
    program = load_entry(folder)
    if program is not None:
      return program
  from spadnet_jax import checkpoint, models  # pylint: disable=import-outside-toplevel
  model, variables, step = checkpoint.load_model(path, report=report)
  variables = jax.device_get(variables)
  program = exported.export_sr(model, variables)
  config = models.to_config(model)
  if folder and found[1] == step:
    store_entry(folder, program, variables, config, step)
  return Program(program.call, variables, config, step, cached=False)
