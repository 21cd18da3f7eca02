"""The model's plain convolution as pure functions: a 3x3 conv, registered formulations of
it (CONV_IMPLS), and a bias add whose gradient XLA:CPU computes fast (ops.reduce.channel_sum)."""
from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from spadnet_jax.ops.dispatch import by_platform
from spadnet_jax.ops.reduce import channel_sum
from spadnet_jax.ops.winograd import conv3x3_winograd_forward
from spadnet_jax.registry import Registry

ConvFormulation = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]   # (x, w) -> (N, H, W, Cout)
CONV_IMPLS: Registry[ConvFormulation] = Registry("conv formulation")
# Where 'winograd' takes F(2x2, 3x3) on XLA:CPU (docs/performance.md): float32 images of
# at least this many rows and columns, more than this many output channels. Smaller
# images ran slower than XLA's convolution (transform overhead per tile); the 3- and
# 5-channel output heads gain nothing from 2.25x fewer multiplies. Nor where a conv has
# more outputs than inputs (the upsamplers' 64 -> 256): its transformed outputs, 4x the
# output, would set the program's peak (317 against 214 MiB of temporaries at batch 8)
# for 2% of the time. Nor for more than one image per call: at batch 4 one 64x64x64 conv
# ran 9.9 against XLA's 7.4 ms (at batch 1 1.6 against 2.0), and the default 16-feature
# model's train.py ran 3.4 against 4.0 steps/s; inference on a CPU runs the paper's model
# one image per step (models.batching), training takes XLA's conv.
WINOGRAD_MIN_SIZE = 64
WINOGRAD_MIN_FEATURES = 8
WINOGRAD_MAX_BATCH = 1
# The XLA:CPU flag that turns its YNN fusions off (process_setup.CPU_FLAGS sets it in our
# programs). With them on, XLA rewrites the Winograd transforms into dots of 4 that YNNPACK
# runs slowly: the conv took 27 ms at 64x64x64, against 2 with them off (XLA's own: 4).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@jax.custom_vjp
def bias_add(y: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """y + b with b broadcast along the last (channel) axis; its gradient uses channel_sum."""
  return y + b


def _bias_add_fwd(y: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  return y + b, b


def _bias_add_bwd(b: jnp.ndarray, g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  return g, channel_sum(g).astype(b.dtype)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def register_conv_formulation(name: str) -> Callable[[ConvFormulation], ConvFormulation]:
  """Decorator: register fn(x, w) as 3x3 conv formulation `name` (model field conv_impl)."""
  return lambda fn: CONV_IMPLS.add(name, fn)


@register_conv_formulation("xla")
def conv3x3_xla(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """XLA's own convolution (the reference: bitwise what lax.conv computes)."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv3x3_winograd(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """The 3x3 convolution by Winograd's F(2x2, 3x3) (ops.winograd); its gradients are the
  direct convolution's: the convolution is linear in x and in w, so the VJP needs neither
  the forward output nor the transformed tiles."""
  return conv3x3_winograd_forward(x, w)


def _winograd_fwd(x: jnp.ndarray, w: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
  return conv3x3_winograd_forward(x, w), (x, w)


def _winograd_bwd(res: tuple[jnp.ndarray, jnp.ndarray], g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  return jax.vjp(conv3x3_xla, *res)[1](g)


conv3x3_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def ynn_fusions_off(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether XLA_FLAGS turns XLA:CPU's YNN fusions off (its last YNN_FUSION_FLAG empty)."""
  values = [f.partition("=")[2] for f in environ.get("XLA_FLAGS", "").split()
            if f.partition("=")[0] == YNN_FUSION_FLAG]
  return bool(values) and not values[-1]


def winograd_pays(x_shape: tuple[int, ...], w_shape: tuple[int, ...], dtype: jnp.dtype) -> bool:
  """Whether 'winograd' runs this convolution as F(2x2, 3x3) on XLA:CPU (WINOGRAD_*: no
  more outputs than inputs, a known batch of one): float32 only, since the transforms'
  round-off in bfloat16 would be that of 8 bits."""
  return (jnp.dtype(dtype) == jnp.float32 and min(x_shape[1:3]) >= WINOGRAD_MIN_SIZE
          and WINOGRAD_MIN_FEATURES < w_shape[-1] <= w_shape[-2]
          and isinstance(x_shape[0], int) and x_shape[0] <= WINOGRAD_MAX_BATCH)


@register_conv_formulation("winograd")
def conv3x3_winograd_where_it_pays(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Winograd's F(2x2, 3x3) forward pass on XLA:CPU where it measured faster
  (winograd_pays) and the process runs with XLA's YNN fusions off (ynn_fusions_off: our
  programs, the tests), XLA's convolution elsewhere and on GPUs and TPUs (whose libraries
  pick their own algorithms); gradients are always the direct convolution's.

  The model's default: about a fifth faster per image on a CPU; its program is larger, so
  compiling (about twice as long) and loading a cached executable cost more
  (docs/performance.md).
  """
  if not (winograd_pays(x.shape, w.shape, x.dtype) and ynn_fusions_off()):
    return conv3x3_xla(x, w)
  return by_platform(conv3x3_winograd, conv3x3_xla, x, w)


def conv3x3(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None,
            impl: str = "xla") -> jnp.ndarray:
  """Stride-1, zero-padded 3x3 convolution, NHWC input and HWIO weight (as a flax Conv),
  by the registered formulation `impl` (CONV_IMPLS); all compute the same function."""
  y = CONV_IMPLS.lookup(impl)(x, w)
  return y if b is None else bias_add(y, b)
