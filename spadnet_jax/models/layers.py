"""SPADNet's building blocks as thin Flax modules over spadnet_jax.ops (NHWC)."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from spadnet_jax import ops

Dtype = Any


class Conv3x3(nn.Module):
  """3x3, stride 1, zero padding 1, with bias: every convolution of the official model.

  The parameters, their initialisers and the result are a flax nn.Conv's (a test checks);
  the computation is ops.conv3x3, by the registered formulation `impl` (ops.CONV_IMPLS),
  whose bias gradient XLA:CPU computes faster.
  """
  features: int
  dtype: Dtype = jnp.float32
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    x, w, b = nn.dtypes.promote_dtype(x, w, b, dtype=self.dtype)
    return ops.conv3x3(x, w, b, impl=self.impl)


def conv3x3(features: int, name: str, dtype: Dtype, impl: str = "xla") -> Conv3x3:
  """The model's convolution layer, named as in the parameter tree."""
  return Conv3x3(features, dtype, impl, name=name)


class ChannelAttention(nn.Module):
  """RCAN channel attention: x * sigmoid(W2 relu(W1 mean_hw(x)))."""
  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    y = jnp.mean(x, axis=(1, 2), keepdims=True)
    y = nn.relu(nn.Dense(max(c // self.reduction, 1), dtype=self.dtype, name="reduce")(y))
    y = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name="expand")(y))
    return x * y


class RCAB(nn.Module):
  """Residual channel-attention block: x + CA(conv(relu(conv(x))))."""
  reduction: int = 16
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    y = nn.relu(conv3x3(c, "conv1", self.dtype, self.conv_impl)(x))
    y = conv3x3(c, "conv2", self.dtype, self.conv_impl)(y)
    return x + ChannelAttention(self.reduction, self.dtype, name="attention")(y)


class Upsample2x(nn.Module):
  """conv3x3 C -> 4C, then pixel shuffle x2 (torch channel order)."""
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return ops.pixel_shuffle(conv3x3(4 * x.shape[-1], "conv", self.dtype, self.conv_impl)(x), 2)


class PacConv(nn.Module):
  """LSAC: a 3x3 pixel-adaptive convolution whose per-pixel kernel comes from `guide`.

  Parameters mirror a 3x3 Conv (kernel (3, 3, Cin, Cout), bias), plus the learnable
  scalars the registered kernel declares (ops.KERNELS), under their declared names.
  """
  features: int
  kernel_type: str = "gaussian"
  impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, guide: jnp.ndarray) -> jnp.ndarray:
    kernel = ops.KERNELS.lookup(self.kernel_type)
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    scalars = {name: self.param(name, nn.initializers.constant(init), ()).astype(self.dtype)
               for name, init in kernel.params.items()}
    k = kernel.fn(guide, 3, **scalars)
    return ops.pac_conv(x, k.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype),
                        impl=self.impl)


@dataclasses.dataclass(frozen=True)
class HabOptions:
  """What a heatmap attention block computes: the PAC kernel and formulation, the GSAC
  gate layout, which dynamic paths are on (ablations), and the plain convolutions'
  formulation."""
  pac_kernel: str = "gaussian"
  pac_impl: str = "auto"
  gsac_gate: str = "official"
  use_lsac: bool = True
  use_gsac: bool = True
  conv_impl: str = "xla"


class HAB(nn.Module):
  """Heatmap attention block (official HeatmapAttentionBlock35G2).

  s = conv(x), h = conv(guide); f1 = LSAC(s, h); f2 = GSAC gate(h) * s;
  out = x + conv(relu(conv(concat(f1, f2)))). `options.use_lsac`/`use_gsac` drop either
  path (ablations); with both off the fusion sees s alone.
  """
  options: HabOptions = HabOptions()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, guide: jnp.ndarray) -> jnp.ndarray:
    o = self.options
    n, height, width, c = x.shape
    conv = lambda features, name: conv3x3(features, name, self.dtype, o.conv_impl)
    s = conv(c, "conv_sr")(x)
    h = conv(c, "conv_guide")(guide)
    paths = []
    if o.use_lsac:
      paths.append(PacConv(c, o.pac_kernel, o.pac_impl, dtype=self.dtype, name="lsac")(s, h))
    if o.use_gsac:
      pooled = jnp.mean(h, axis=(1, 2), keepdims=True)                 # (N, 1, 1, C)
      g = nn.sigmoid(conv(c, "gsac")(pooled)).reshape(n, c)
      paths.append(ops.gate_map(g, height, width, o.gsac_gate) * s)
    f = jnp.concatenate(paths, axis=-1) if paths else s
    f = nn.relu(conv(c, "fuse")(f))
    return x + conv(c, "out")(f)
