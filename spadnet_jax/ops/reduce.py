"""Sums that XLA:CPU computes faster as matrix products with a vector of ones.

XLA:CPU rewrites a reduction of an NHWC array, over N, H and W or over the channel axis,
into strided reduce-windows that run several times slower than multiplying the array by
ones (docs/performance.md). GPUs and TPUs keep the plain reduction.
"""
from __future__ import annotations

import jax.numpy as jnp

from spadnet_jax.ops.dispatch import by_platform


def accumulation_dtype(dtype: jnp.dtype | type) -> jnp.dtype:
  """Accumulate in at least float32, so bfloat16 models sum taps and channels exactly enough."""
  return jnp.promote_types(dtype, jnp.float32)


def channel_sum(g: jnp.ndarray) -> jnp.ndarray:
  """Sum of g over every axis but the last, accumulated in float32 or wider: (..., C) -> (C,).

  A conv's bias gradient: ones(P) @ g on CPU, a reduction elsewhere.
  """
  acc = accumulation_dtype(g.dtype)

  def by_matmul(g: jnp.ndarray) -> jnp.ndarray:
    rows = g.reshape(-1, g.shape[-1])
    return jnp.matmul(jnp.ones((rows.shape[0],), rows.dtype), rows, preferred_element_type=acc)

  return by_platform(by_matmul, lambda g: jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=acc), g)


def feature_sum(v: jnp.ndarray) -> jnp.ndarray:
  """Sum of v over its last axis, kept as a size-1 axis, in float32 or wider: (..., C) -> (..., 1).

  Per-pixel dot products and distances: v @ ones(C, 1) on CPU, a reduction elsewhere.
  """
  acc = accumulation_dtype(v.dtype)

  def by_matmul(v: jnp.ndarray) -> jnp.ndarray:
    return jnp.matmul(v, jnp.ones((v.shape[-1], 1), v.dtype), preferred_element_type=acc)

  return by_platform(by_matmul, lambda v: jnp.sum(v, -1, keepdims=True, dtype=acc), v)
