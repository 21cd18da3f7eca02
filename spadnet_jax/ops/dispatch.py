"""Choosing a formulation per compile target: some ops run fastest in different forms on
XLA:CPU and on GPUs/TPUs, and one jitted function must serve both."""
from __future__ import annotations

from typing import Any, Callable

import jax


def by_platform(cpu: Callable, default: Callable, *args: Any) -> Any:
  """cpu(*args) when compiling for XLA:CPU, default(*args) for GPUs and TPUs.

  Resolved when lowering (lax.platform_dependent), so the unused branch costs nothing.
  """
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
