"""Setting up a program's process before JAX starts: XLA:CPU flags, glibc malloc
tunables, and jax.distributed on multi-host runs.

Entry points make one call: absl programs (train.py, eval.py) go through cli.run, which
calls prepare() and then initialize_distributed(); argparse programs call prepare() in
their `if __name__ == "__main__":` block. Why each setting: docs/performance.md.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Mapping, Sequence

from absl import flags

from spadnet_jax import compile_cache
from spadnet_jax.storage import paths

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
NO_RESTART = "SPADNET_NO_RESTART"   # set (to anything) to keep the process as started


def configure_xla_cpu() -> None:
  """Add CPU_FLAGS to XLA_FLAGS (XLA:CPU's YNNPACK fusions off: they slow the convolution
  backward passes), leaving any flag the user set alone."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def malloc_restart(environ: Mapping[str, str], argv: Sequence[str] | None, executable: str,
                   glibc: bool) -> tuple[list[str], dict[str, str]] | None:
  """The command line and environment that restart a process with MALLOC_TUNABLES, or None
  where there is nothing to do: not glibc, no original command line, NO_RESTART set, or
  GLIBC_TUNABLES already naming each tunable (the user's own values, or after a restart)."""
  current = environ.get("GLIBC_TUNABLES", "")
  missing = [t for t in MALLOC_TUNABLES if t.split("=")[0] not in current]
  if not glibc or not argv or not executable or NO_RESTART in environ or not missing:
    return None
  return [executable, *argv[1:]], {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, *missing]))}


def _is_glibc() -> bool:
  try:
    return bool(os.confstr("CS_GNU_LIBC_VERSION"))
  except (ValueError, OSError, AttributeError):
    return False


def restart_with_malloc_tunables() -> None:
  """Re-execute this process (same command line, same PID) with MALLOC_TUNABLES set, once.

  glibc reads its tunables only at start-up; huge pages for malloc cut the page faults of
  XLA:CPU's per-step temporaries. Only for a program's own `if __name__ == "__main__":`
  block, before JAX starts: the whole command runs again, so a function others may call
  (an entry point's main) must not. A no-op off glibc, where the user set
  GLIBC_TUNABLES's entries, or with NO_RESTART set.
  """
  restart = malloc_restart(os.environ, getattr(sys, "orig_argv", None), sys.executable, _is_glibc())
  if restart:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(restart[0][0], restart[0], restart[1])


def release_host_memory() -> None:
  """Return freed heap memory (e.g. the compiler's scratch) to the OS after compiling, so a
  CPU run's peak memory is what the computation itself needs. A no-op without glibc."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def quiet_native_logs(argv: Sequence[str]) -> None:
  """Hide TensorFlow's C++ start-up notices (TensorBoard writing imports TensorFlow) unless
  the command line asks for --verbosity; values the user set are kept.

  TF_CPP_MIN_LOG_LEVEL hides most of them, but not the oneDNN notice (and the absl line
  before it) that TensorFlow 2.21 prints at import on CPUs where it turns oneDNN on: only
  TF_ENABLE_ONEDNN_OPTS=0 does. TensorFlow computes nothing here (it writes events), so
  its oneDNN kernels are not needed.
  """
  if not any(a.startswith(("--verbosity", "-v=")) for a in argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# What libtpu asks a TPU VM's metadata server for, as placeholders on a machine without
# TPUs; and no machine-wide lock (/tmp/libtpu_lockfile): there is no TPU to guard, and
# several processes may compile for TPUs at once.
TPU_PLACEHOLDERS = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-1",
                    "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_chips_present(pci_root: str = "/sys/bus/pci/devices") -> bool:
  """Whether the machine has a Google PCI device (a TPU chip), as JAX itself detects them."""
  try:
    entries = os.listdir(pci_root)
  except OSError:
    return False
  for entry in entries:
    try:
      with open(os.path.join(pci_root, entry, "vendor")) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def quiet_absent_tpu(environ: dict[str, str] | None = None) -> None:
  """Where libtpu is installed (jax[tpu], for ahead-of-time TPU compilation) but the
  machine has no TPU, libtpu's start-up prints errors about the TPU VM metadata it cannot
  find; give it single-host placeholders instead. Values the user set are kept; a no-op
  on a TPU machine or without libtpu."""
  environ = os.environ if environ is None else environ
  if importlib.util.find_spec("libtpu") is None or tpu_chips_present():
    return
  for key, value in TPU_PLACEHOLDERS.items():
    environ.setdefault(key, value)


def prepare(long_running: bool = True) -> None:
  """A program's process set-up before JAX starts: restart with the malloc tunables (once,
  for `long_running` programs: training and evaluation), then the XLA:CPU flags, the
  persistent compilation cache and quiet native logs. Only from a program's own
  `if __name__ == "__main__":` block.

  The object-store clients are routed (storage/paths.py) before any of them is imported.
  A short call (predict over a folder) skips the restart: huge pages pay back their
  zeroing over many steps, and a 10-face predict call took about 0.8 s longer with them
  (docs/performance.md).
  """
  if long_running:
    restart_with_malloc_tunables()
  configure_xla_cpu()
  paths.configure_clients()
  compile_cache.configure()
  quiet_native_logs(sys.argv)
  quiet_absent_tpu()


# --- multi-host start-up ---------------------------------------------------------------------

def define_distributed_flags() -> None:
  """The flags initialize_distributed reads (absl programs)."""
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "auto: initialise on TPU pods and multi-task SLURM jobs, or when "
                    "--coordinator_address is given.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which a "
                       "process counts as lost; the others then exit (JAX's coordination "
                       "service) instead of waiting for it.")
  flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for every process to "
                       "join at start-up.")


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]


def initialize_distributed() -> None:
  """jax.distributed.initialize when the flags (define_distributed_flags) or the cluster
  environment ask for it; nothing for a program without those flags."""
  f = flags.FLAGS
  if "distributed" not in f:
    return
  explicit = f.coordinator_address is not None
  if f.distributed == "off" or (f.distributed == "auto" and not explicit and not _cluster_detected()):
    return
  import jax  # pylint: disable=import-outside-toplevel  # after the XLA flags are set
  timeouts = dict(heartbeat_timeout_seconds=f.heartbeat_timeout,
                  initialization_timeout=f.initialization_timeout)
  if explicit:
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id, **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
