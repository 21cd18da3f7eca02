"""What XLA compiled, kept across processes: JAX's persistent compilation cache.

predict, eval.py and a resumed train.py compile the same programs each time they start;
JAX can keep the executables on disk, keyed by the program, its shapes, the compiler
options and flags and the jax/jaxlib versions, so an entry is never used for another
checkpoint shape or after an upgrade. Programs set it up before JAX starts
(process_setup.prepare): the cache lives in xla/ under cache_root() ($SPADNET_CACHE_DIR,
else $XDG_CACHE_HOME/spadnet_jax, i.e. ~/.cache/spadnet_jax), which predict's --cache_dir
also moves; a JAX_COMPILATION_CACHE_DIR the user set wins over the environment. A size limit turns on JAX's least-recently-used eviction, and with it a file
lock around every read and write, so that processes sharing the folder never read an entry
another is still writing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Iterator, MutableMapping

ENV = "SPADNET_CACHE_DIR"
MAX_BYTES = 2 << 30
_HITS, _MISSES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def cache_root(environ: MutableMapping[str, str]) -> str:
  """$SPADNET_CACHE_DIR, else spadnet_jax/ in the per-user cache folder ($XDG_CACHE_HOME or
  ~/.cache): what the project keeps between runs (xla/, and predict's programs/)."""
  if environ.get(ENV):
    return environ[ENV]
  home = environ.get("HOME") or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  return os.path.join(base, "spadnet_jax")


def default_dir(environ: MutableMapping[str, str]) -> str:
  """The compilation cache's folder: xla/ under cache_root."""
  return os.path.join(cache_root(environ), "xla")


def configure(environ: MutableMapping[str, str] | None = None, root: str | None = None) -> None:
  """Point JAX's persistent compilation cache at default_dir, with a size limit, before
  the first compilation; values the user set in the environment are kept, but an explicit
  `root` (a --cache_dir flag) moves the whole cache there. JAX reads its environment when
  it is imported, so where a program imported it already its config is updated too."""
  environ = os.environ if environ is None else environ
  if root is not None:
    environ[ENV] = root
  elif environ.get("JAX_COMPILATION_CACHE_DIR"):
    return        # the user's own cache, as they configured it
  environ["JAX_COMPILATION_CACHE_DIR"] = default_dir(environ)
  # Only in our own folder: JAX's eviction expects every entry to have been written with it.
  environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES))
  if "jax" in sys.modules and environ is os.environ:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_compilation_cache_max_size", int(environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


@dataclasses.dataclass
class Lookups:
  """Persistent-cache lookups seen while watching: executables loaded and ones compiled
  and stored."""
  hits: int = 0
  misses: int = 0


@contextlib.contextmanager
def watch() -> Iterator[Lookups]:
  """Count the persistent cache's hits and misses (compiled and stored) inside the block."""
  from jax import monitoring  # pylint: disable=import-outside-toplevel
  seen = Lookups()

  def listener(event: str, **kwargs: Any) -> None:
    del kwargs
    if event == _HITS:
      seen.hits += 1
    elif event == _MISSES:
      seen.misses += 1

  monitoring.register_event_listener(listener)
  try:
    yield seen
  finally:
    monitoring.unregister_event_listener(listener)
