"""Choosing a formulation per compile target: some ops run fastest (or fit best) in
different forms on XLA:CPU, GPUs and TPUs, and one jitted function must serve them all."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax


_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("traced_for", default=None)


def by_platform(cpu: Callable, default: Callable, *args: Any, tpu: Callable | None = None) -> Any:
  """cpu(*args) when compiling for XLA:CPU, tpu(*args) for TPUs where given, default(*args)
  otherwise (GPUs).

  Resolved when lowering (lax.platform_dependent), so the unused branches cost nothing;
  inside traced_for(), when tracing.
  """
  chosen = _TRACED_FOR.get()
  if chosen is not None:
    return {"cpu": cpu, "tpu": tpu or default}.get(chosen, default)(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default,
                                    **({"tpu": tpu} if tpu is not None else {}))


@contextlib.contextmanager
def traced_for(platform: str) -> Iterator[None]:
  """Within the block, by_platform picks `platform`'s branch while tracing: for a program
  that holds no platform switch (an ONNX graph, which has no such operator)."""
  token = _TRACED_FOR.set(platform)
  try:
    yield
  finally:
    _TRACED_FOR.reset(token)
