"""Process-level XLA settings that entry points (train.py, eval.py, benchmarks) apply.

XLA:CPU's experimental YNNPACK fusions make 3x3 convolution backward passes about 2.8x
slower on the 2-core x86 machines we measured (64x64x64, batch 8: 0.126 s vs 0.044 s for
forward + backward), so entry points turn them off unless the user's XLA_FLAGS already
says otherwise. It only affects the CPU backend and must run before JAX starts a backend.
"""
from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure_xla_cpu() -> None:
  """Add CPU_FLAGS to XLA_FLAGS, leaving any flag the user set alone."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


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
