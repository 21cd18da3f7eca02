"""Pixel-adaptive convolution (PAC, Su et al. 2019): SPADNet's LSAC layer as pure functions.

Shapes (NHWC): guidance `h` (N, H, W, Cg), input `x` (N, H, W, Cin), adaptive kernel
`k` (N, H, W, T) with T = ksize*ksize taps in row-major window order (tap t = (dy+r)*ksize
+ (dx+r) for offset (dy, dx), r = ksize//2), weight `w` (ksize, ksize, Cin, Cout) as in a
flax Conv, bias `b` (Cout,).

    out[n, p, o] = sum_{t, c} w[t, c, o] * k[n, p, t] * x_pad[n, p + off(t), c] + b[o]

Both `x` and `h` are zero-padded at the border, as the official code does. Kernel
functions and convolution formulations are registered by name, so a research variant
(or a faster formulation) replaces one entry without touching the Flax modules.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp


def window_offsets(ksize: int) -> Iterator[tuple[int, int, int]]:
  """Yields (tap, dy, dx) for a ksize x ksize window in row-major order."""
  r = ksize // 2
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      yield (dy + r) * ksize + (dx + r), dy, dx


def shift(x: jnp.ndarray, dy: int, dx: int) -> jnp.ndarray:
  """out[:, y, x] = x[:, y+dy, x+dx], zero outside the image. (N, H, W, C) -> same."""
  n, h, w, c = x.shape
  pad_y, pad_x = abs(dy), abs(dx)
  xp = jnp.pad(x, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)))
  return jax.lax.dynamic_slice(xp, (0, pad_y + dy, pad_x + dx, 0), (n, h, w, c))


def unfold(x: jnp.ndarray, ksize: int = 3) -> jnp.ndarray:
  """Zero-padded ksize x ksize patches: (N, H, W, C) -> (N, H, W, T, C)."""
  return jnp.stack([shift(x, dy, dx) for _, dy, dx in window_offsets(ksize)], axis=3)


def squared_distances(h: jnp.ndarray, ksize: int = 3) -> jnp.ndarray:
  """d[n, p, t] = sum_c (h_pad[n, p + off(t), c] - h[n, p, c])^2, (N, H, W, T)."""
  return jnp.stack([jnp.sum(jnp.square(shift(h, dy, dx) - h), axis=-1)
                    for _, dy, dx in window_offsets(ksize)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gaussian_kernel(h: jnp.ndarray, ksize: int = 3) -> jnp.ndarray:
  """Official LSAC kernel: exp(-0.5 * ||h_q - h_p||^2). (N, H, W, Cg) -> (N, H, W, T).

  Its gradient recomputes the per-tap differences instead of keeping T copies of h
  alive between the forward and backward passes.
  """
  return jnp.exp(-0.5 * squared_distances(h, ksize))


def _gaussian_fwd(h, ksize):
  k = gaussian_kernel(h, ksize)
  return k, (h, k)


def _gaussian_bwd(ksize, res, dk):
  h, k = res
  a = dk * k                       # d k_t / d dist_t = -0.5 k_t; d dist_t / d h = +-2 diff
  dh = jnp.zeros_like(h)
  for t, dy, dx in window_offsets(ksize):
    term = a[..., t:t + 1] * (shift(h, dy, dx) - h)
    dh = dh + term - shift(term, -dy, -dx)
  return (dh,)


gaussian_kernel.defvjp(_gaussian_fwd, _gaussian_bwd)


def inverse_kernel(h: jnp.ndarray, ksize: int = 3, alpha: jnp.ndarray | float = 0.0,
                   lam: jnp.ndarray | float = -1.0, eps: float = 1e-4) -> jnp.ndarray:
  """PAC paper's inverse kernel: alpha + (||h_q - h_p||^2 + eps)^(lam / 2).

  With lam < 0 the weight falls with feature distance like an inverse power;
  `alpha` and `lam` may be learnable scalars.
  """
  return alpha + jnp.power(squared_distances(h, ksize) + eps, 0.5 * lam)


def pac_conv_einsum(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                    b: jnp.ndarray | None = None) -> jnp.ndarray:
  """Reference PAC: unfold x (a 9x copy of it), weight by k, contract with w in one einsum."""
  ksize = w.shape[0]
  cols = unfold(x, ksize)                               # (N, H, W, T, Cin)
  wt = w.reshape(ksize * ksize, w.shape[2], w.shape[3])  # (T, Cin, Cout)
  out = jnp.einsum("nhwtc,nhwt,tco->nhwo", cols, k, wt)
  return out if b is None else out + b


def pac_conv_shifted(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                     b: jnp.ndarray | None = None) -> jnp.ndarray:
  """PAC as a sum over taps of shifted, kernel-weighted 1x1 products.

  Never materialises the unfolded input: each tap contributes
  (shift(x, off) * k[..., t]) @ w[t], accumulated in place. Same result as
  `pac_conv_einsum` up to float round-off.
  """
  ksize = w.shape[0]
  out = None
  for t, dy, dx in window_offsets(ksize):
    term = jnp.einsum("nhwc,co->nhwo", shift(x, dy, dx) * k[..., t:t + 1], w[dy + ksize // 2,
                                                                               dx + ksize // 2])
    out = term if out is None else out + term
  return out if b is None else out + b


@jax.custom_vjp
def pac_conv_fused(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                   b: jnp.ndarray | None = None) -> jnp.ndarray:
  """`pac_conv_shifted` with a hand-written gradient that keeps only (x, k, w) alive.

  Backward, per tap t: G = dout @ w_t^T; dk_t = sum_c shift(x)_t * G;
  dx += unshift(k_t * G); dw_t = (shift(x)_t * k_t)^T @ dout. The fastest formulation
  on CPU (benchmarks/run.py) and the default of the models.
  """
  return pac_conv_shifted(x, k, w, b)


def _fused_fwd(x, k, w, b):
  return pac_conv_shifted(x, k, w, b), (x, k, w, b is None)


def _fused_bwd(res, g):
  x, k, w, no_bias = res
  ksize = w.shape[0]
  g2 = g.reshape(-1, g.shape[-1])
  dx, dk, dw = jnp.zeros_like(x), [], []
  for t, dy, dx_ in window_offsets(ksize):
    wt = w[dy + ksize // 2, dx_ + ksize // 2]
    xt = shift(x, dy, dx_)
    grad_in = g @ wt.T
    dk.append(jnp.sum(xt * grad_in, axis=-1))
    dx = dx + shift(k[..., t:t + 1] * grad_in, -dy, -dx_)
    dw.append((xt * k[..., t:t + 1]).reshape(-1, x.shape[-1]).T @ g2)
  db = None if no_bias else jnp.sum(g2, axis=0)
  return dx, jnp.stack(dk, axis=-1), jnp.stack(dw).reshape(w.shape), db


pac_conv_fused.defvjp(_fused_fwd, _fused_bwd)


KERNELS: dict[str, Callable[..., jnp.ndarray]] = {
    "gaussian": gaussian_kernel,
    "inverse": inverse_kernel,
}

PAC_IMPLS: dict[str, Callable[..., jnp.ndarray]] = {
    "einsum": pac_conv_einsum,
    "shifted": pac_conv_shifted,
    "fused": pac_conv_fused,
}


def pac_conv(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None,
             impl: str = "einsum") -> jnp.ndarray:
  """Pixel-adaptive convolution with the formulation named by `impl` (see PAC_IMPLS)."""
  try:
    fn = PAC_IMPLS[impl]
  except KeyError:
    raise ValueError(f"unknown PAC implementation {impl!r}; known: {sorted(PAC_IMPLS)}") from None
  return fn(x, k, w, b)
