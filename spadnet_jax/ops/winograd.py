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
import numpy as np

# Input transform B^T (4x4), weight transform G (4x3), output transform A^T (2x4).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
TILE, OUT = 4, 2   # input tile and output block edge


def _combine(terms: list[jnp.ndarray], coeffs: np.ndarray) -> jnp.ndarray:
  """sum_i coeffs[i] * terms[i], skipping zeros and multiplying only where |c| != 1 (the
  transforms' rows are sparse, mostly +-1: XLA fuses the whole sum into one pass)."""
  out = None
  for c, t in zip(coeffs, terms):
    if c == 0:
      continue
    t = t if c == 1 else -t if c == -1 else t * c
    out = t if out is None else out + t
  return out


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
  # d[i][j] (N, th, tw, Cin): the input tiles' element (i, j), as strided slices (no gather).
  d = [[xp[:, i:i + OUT * th:OUT, j:j + OUT * tw:OUT] for j in range(TILE)] for i in range(TILE)]
  bd = [[_combine([d[k][j] for k in range(TILE)], _BT[i]) for j in range(TILE)] for i in range(TILE)]
  v = jnp.stack([_combine([bd[i][k] for k in range(TILE)], _BT[j])
                 for i in range(TILE) for j in range(TILE)])                 # (16, N, th, tw, Cin)
  m = jnp.einsum("pntsc,pco->pntso", v, transform_weights(w))               # (16, N, th, tw, Cout)
  m = [[m[i * TILE + j] for j in range(TILE)] for i in range(TILE)]
  am = [[_combine([m[k][j] for k in range(TILE)], _AT[i]) for j in range(TILE)] for i in range(OUT)]
  y = jnp.stack([jnp.stack([_combine([am[i][k] for k in range(TILE)], _AT[j]) for j in range(OUT)], 3)
                 for i in range(OUT)], 2)                                    # (N, th, 2, tw, 2, Cout)
  return y.reshape(n, OUT * th, OUT * tw, -1)[:, :h, :wd]
