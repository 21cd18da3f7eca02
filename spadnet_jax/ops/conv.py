"""The model's plain convolution as pure functions: a 3x3 conv and a bias add whose
gradient XLA:CPU computes fast (ops.reduce.channel_sum)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from spadnet_jax.ops.reduce import channel_sum


@jax.custom_vjp
def bias_add(y: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """y + b with b broadcast along the last (channel) axis; its gradient uses channel_sum."""
  return y + b


def _bias_add_fwd(y: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  return y + b, b


def _bias_add_bwd(b: jnp.ndarray, g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  return g, channel_sum(g).astype(b.dtype)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def conv3x3(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None) -> jnp.ndarray:
  """Stride-1, zero-padded 3x3 convolution, NHWC input and HWIO weight (as a flax Conv)."""
  y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if b is None else bias_add(y, b)
