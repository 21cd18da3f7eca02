"""Shared test set-up: the official-model fixtures and small helpers."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from spadnet_jax import process_setup

process_setup.configure_xla_cpu()   # before any test starts a JAX backend
process_setup.quiet_absent_tpu()     # libtpu (jax[tpu], for tests/test_tpu.py) without a TPU
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # tests need no accelerator

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(os.environ.get("SPADNET_FIXTURES", REPO.parent / "shared" / "fixtures"))

def fixture_path(name: str) -> pathlib.Path:
  """Path of an official fixture; skips (fails under CI=true) when it is absent."""
  path = FIXTURES / f"{name}.npz"
  if not path.is_file():
    msg = (f"official fixture {path} is absent: set SPADNET_FIXTURES to the folder holding "
           "the official-model .npz fixtures")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path

@pytest.fixture
def rng():
  return np.random.default_rng(0)


def pytest_sessionstart(session):
  """Share compiled executables between tests and their subprocesses (tiny models
  recompile identically many times); the cache lives in a temporary folder."""
  import tempfile
  cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                os.path.join(tempfile.gettempdir(), "spadnet_test_jax_cache"))
  # A program started without that variable uses its own cache (compile_cache): a temporary
  # one too, never the user's ~/.cache.
  os.environ.setdefault("SPADNET_CACHE_DIR",
                        os.path.join(tempfile.gettempdir(), "spadnet_test_program_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  import jax
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(trylast=True)     # after -m has deselected what will not run
def pytest_collection_modifyitems(config, items):
  """Start tests/test_tpu.py's TPU compilation (minutes of one process, mostly one core) in
  the background as soon as it is selected; its test collects the result. Under xdist the
  worker that gets the test compiles then, while the other worker goes on."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    return
  if any("tiny_tpu_compile" in getattr(item, "fixturenames", ()) for item in items):
    from tests import test_tpu  # pylint: disable=import-outside-toplevel
    config.stash[test_tpu.BACKGROUND] = test_tpu.start_tiny_compile()


def pytest_sessionfinish(session):
  from tests import test_tpu  # pylint: disable=import-outside-toplevel
  run = session.config.stash.get(test_tpu.BACKGROUND, None)
  if run is not None:
    run.stop()
