"""Process-level settings: XLA flags, and the restart that gives glibc's malloc huge pages."""
import os
import subprocess
import sys

import pytest

from spadnet_jax import process_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGV = ["python", "-m", "benchmarks.run", "--cases", "pac"]


def test_restart_command_keeps_the_command_line_and_adds_the_tunable():
  cmd, env = process_setup.malloc_restart({"PATH": "/bin"}, ARGV, "/venv/bin/python", glibc=True)
  assert cmd == ["/venv/bin/python", "-m", "benchmarks.run", "--cases", "pac"]
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # The user's other tunables are kept.
  _, env = process_setup.malloc_restart({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ARGV, "py", glibc=True)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_no_restart_where_there_is_nothing_to_do():
  restart = lambda env, argv=ARGV, glibc=True: process_setup.malloc_restart(env, argv, "py", glibc)
  assert restart({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None   # the user's own value
  assert restart({process_setup.NO_RESTART: "1"}) is None
  assert restart({}, glibc=False) is None
  assert restart({}, argv=None) is None and restart({}, argv=[]) is None


@pytest.mark.slow
def test_restart_runs_the_program_once_with_the_tunable():
  code = ("import os, sys; from spadnet_jax import process_setup; print('start', flush=True); "
          "process_setup.restart_with_malloc_tunables(); print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", process_setup.NO_RESTART)}
  run = lambda env: subprocess.run([sys.executable, "-c", code, "a b", "--c"], cwd=REPO, env=env,
                                   capture_output=True, text=True, check=True).stdout.splitlines()
  if process_setup._is_glibc():   # pylint: disable=protected-access
    assert run(env) == ["start", "start", "glibc.malloc.hugetlb=1 ['a b', '--c']"]
  assert run({**env, process_setup.NO_RESTART: "1"}) == ["start", "None ['a b', '--c']"]


def test_configure_xla_cpu_keeps_the_users_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=all --foo")
  process_setup.configure_xla_cpu()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=all --foo"
  monkeypatch.setenv("XLA_FLAGS", "--foo")
  process_setup.configure_xla_cpu()
  assert os.environ["XLA_FLAGS"] == "--foo --xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_tensorflow_import_is_silent_unless_verbosity_asks(verbose):
  """TensorFlow (imported for TensorBoard events) prints its oneDNN and CPU notices at import
  on stderr unless quieted; --verbosity keeps them. The user's own settings are kept."""
  argv = ["train.py"] + (["--verbosity=1"] if verbose else [])
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  code = ("import sys; from spadnet_jax import process_setup; "
          f"process_setup.quiet_native_logs({argv!r}); import tensorflow")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert (r.stderr != "") == verbose, r.stderr
