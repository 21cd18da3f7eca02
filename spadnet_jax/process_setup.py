"""Process-level settings that entry points (train.py, eval.py, benchmarks) apply.

XLA:CPU's experimental YNNPACK fusions make 3x3 convolution backward passes about 2.8x
slower on the 2-core x86 machines we measured (64x64x64, batch 8: 0.126 s vs 0.044 s for
forward + backward), so entry points turn them off unless the user's XLA_FLAGS already
says otherwise. It only affects the CPU backend and must run before JAX starts a backend.

XLA:CPU allocates a step's temporaries afresh on every call (1.1 GB for the paper-size
train step at batch 8), and glibc's malloc maps such blocks from the kernel each time in
4 KiB pages: 280,000 page faults per train step. With glibc's malloc asking for
transparent huge pages (the tunable glibc.malloc.hugetlb=1) it took 3,000-25,000, and
the step 4.15-4.62 s -> 3.88-4.19 s (three runs each, alternated) at the same peak memory.
glibc reads its tunables only when a process starts, so entry points restart themselves
once with the tunable set (restart_with_malloc_tunables).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)
NO_RESTART = "SPADNET_NO_RESTART"   # set (to anything) to keep the process as started


def configure_xla_cpu() -> None:
  """Add CPU_FLAGS to XLA_FLAGS, leaving any flag the user set alone."""
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

  Only for a program's own `if __name__ == "__main__":` block, before JAX starts: the whole
  command runs again, so a function others may call (an entry point's main) must not.
  A no-op off glibc, where the user set GLIBC_TUNABLES's entries, or with NO_RESTART set.
  """
  restart = malloc_restart(os.environ, getattr(sys, "orig_argv", None), sys.executable, _is_glibc())
  if restart:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(restart[0][0], restart[0], restart[1])


def release_host_memory() -> None:
  """Return freed heap memory (e.g. the compiler's scratch) to the OS.

  XLA compilation leaves several hundred MB in glibc's free lists; trimming them after
  compiling keeps a CPU run's peak memory to what the computation itself needs.
  A no-op where glibc's malloc_trim is unavailable.
  """
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
