"""Choosing a formulation per compile target: some ops run fastest (or fit best) in
different forms on XLA:CPU, GPUs and TPUs, and one jitted function must serve them all."""
from __future__ import annotations

from typing import Any, Callable

import jax


def by_platform(cpu: Callable, default: Callable, *args: Any, tpu: Callable | None = None) -> Any:
  """cpu(*args) when compiling for XLA:CPU, tpu(*args) for TPUs where given, default(*args)
  otherwise (GPUs).

  Resolved when lowering (lax.platform_dependent), so the unused branches cost nothing.
  """
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default,
                                    **({"tpu": tpu} if tpu is not None else {}))
