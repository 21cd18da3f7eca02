"""A 3x3 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016).

Each 2x2 block of outputs is computed from the 4x4 block of inputs around it as

    Y = A^T [ (G w G^T) . (B^T d B) ] A

where the 16 elementwise products (.) become 16 matrix products over channels, one per
position of the 4x4 transformed tile: (tiles, Cin) x (Cin, Cout). That is 16 multiplies per
4 outputs and channel pair against 36 for the direct convolution, 2.25x fewer; the price is
the input and output transforms (additions only) and float32 round-off a few times the
direct form's (about 1e-6 relative; tests/test_ops_conv.py). F(4x4, 3x3) would save 4x but
its transforms' constants (up to 8 and 1/24) cost about ten times the round-off, too much
for the official-output parity (docs/performance.md).

The math only: ops.conv registers it as the 'winograd' formulation, whose gradients are
the direct convolution's.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
import numpy as np

# Input transform B^T (4x4), weight transform G (4x3), output transform A^T (2x4).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
TILE, OUT = 4, 2   # input tile and output block edge


def _apply(m: np.ndarray, a: jnp.ndarray, axis: int) -> jnp.ndarray:
  """out[i] = sum_k m[i, k] a[k] along `axis`, as one broadcast product and sum: XLA fuses
  each into a single pass over `a` (written as separate sums per output it emitted a kernel
  for each of the 16 and then copied them together; docs/performance.md)."""
  a = jnp.moveaxis(a, axis, 0)
  mm = jnp.asarray(m, a.dtype).reshape(m.shape + (1,) * (a.ndim - 1))
  return jnp.moveaxis(jnp.sum(mm * a[None], axis=1), 0, axis)


def _every_other(a: jnp.ndarray, start: int, count: int, axis: int) -> jnp.ndarray:
  """a[start], a[start + OUT], ... (`count` of them) along `axis`: a strided slice. Slices
  here are written with lax rather than indexing, which gathers instead where another axis
  is symbolic (jax.export's batch dimension); the gathers cost a tenth of the model's time."""
  return lax.slice_in_dim(a, start, start + OUT * (count - 1) + 1, OUT, axis)


def transform_weights(w: jnp.ndarray) -> jnp.ndarray:
  """G w G^T for each channel pair: (3, 3, Cin, Cout) -> (16, Cin, Cout)."""
  u = jnp.einsum("ik,klco,jl->ijco", _G.astype(w.dtype), w, _G.astype(w.dtype))
  return u.reshape(TILE * TILE, *w.shape[2:])


def conv3x3_winograd_forward(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Zero-padded, stride-1 3x3 convolution of NHWC x with HWIO w, any H and W (odd sizes
  are padded to whole blocks and cropped)."""
  n, h, wd, _ = x.shape
  th, tw = -(-h // OUT), -(-wd // OUT)   # output blocks per column and row
  xp = jnp.pad(x, ((0, 0), (1, 1 + OUT * th - h), (1, 1 + OUT * tw - wd), (0, 0)))
  # The tiles' rows i (strided slices, no gather), B^T along them, then their columns j.
  rows = jnp.stack([_every_other(xp, i, th, 1) for i in range(TILE)])       # (4, N, th, W+2, Cin)
  rows = _apply(_BT, rows, 0)
  tiles = jnp.stack([_every_other(rows, j, tw, 3) for j in range(TILE)], 1)  # (4, 4, N, th, tw, Cin)
  v = _apply(_BT, tiles, 1).reshape(TILE * TILE, -1, x.shape[-1])
  m = jnp.einsum("ptc,pco->pto", v, transform_weights(w))                   # 16 products over Cin
  m = m.reshape(TILE, TILE, n, th, tw, -1)
  y = _apply(_AT, _apply(_AT, m, 0), 1)                                      # (2, 2, N, th, tw, Cout)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, OUT * th, OUT * tw, -1)
  return lax.slice_in_dim(lax.slice_in_dim(y, 0, h, axis=1), 0, wd, axis=2)
