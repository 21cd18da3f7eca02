"""PAC guidance kernels: how strongly pixel p listens to its neighbour q, from guidance h.

A kernel maps guidance h (N, H, W, Cg) to k (N, H, W, T), T = ksize*ksize taps in
row-major window order (ops.windows), h zero-padded at the border as the official code
does. Kernels are registered by name with the learnable scalars they need; PacConv
creates those parameters and the converter maps or rejects them by name.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from spadnet_jax.ops.ordering import after
from spadnet_jax.ops.reduce import accumulation_dtype, feature_sum
from spadnet_jax.ops.windows import for_each_tap, pad_window, tap_slice, window_offsets
from spadnet_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class PacKernel:
  """A registered kernel: fn(h, ksize, **params) -> k, and its learnable scalars'
  names and initial values (created by PacConv as parameters of those names)."""
  fn: Callable[..., jnp.ndarray]
  params: Mapping[str, float] = dataclasses.field(default_factory=dict)


KERNELS: Registry[PacKernel] = Registry("PAC kernel")


def register_kernel(name: str, params: Mapping[str, float] | None = None) -> Callable:
  """Decorator: register fn(h, ksize, **params) as PAC kernel `name` (model field
  pac_kernel); `params` names its learnable scalars and their initial values."""

  def add(fn: Callable[..., jnp.ndarray]) -> Callable[..., jnp.ndarray]:
    KERNELS.add(name, PacKernel(fn, dict(params or {})))
    return fn

  return add


def _wide_grid(h: jnp.ndarray, ksize: int) -> tuple[jnp.ndarray, tuple[int, ...]]:
  """h zero-padded by a whole window (2r), and the shape of its once-padded pixel grid q."""
  r = ksize // 2
  h_wide = jnp.pad(h, ((0, 0), (2 * r, 2 * r), (2 * r, 2 * r), (0, 0)))
  return h_wide, (h.shape[0], h.shape[1] + 2 * r, h.shape[2] + 2 * r, h.shape[3])


def _pair_diff(h_wide: jnp.ndarray, t: jnp.ndarray, ksize: int, grid: tuple[int, ...]) -> jnp.ndarray:
  """h(q + off(t)) - h(q) over the grid, in float32 or wider: shared by tap t and its mirror."""
  centre = ksize * ksize // 2
  return (tap_slice(h_wide, t, ksize, grid) - tap_slice(h_wide, centre, ksize, grid)).astype(
      accumulation_dtype(h_wide.dtype))


def squared_distances(h: jnp.ndarray, ksize: int = 3) -> jnp.ndarray:
  """d[n, p, t] = sum_c (h_pad[n, p + off(t), c] - h[n, p, c])^2, (N, H, W, T).

  The distance is symmetric, d[p, t] = d[p + off(t), mirror(t)], so only the taps after
  the centre are computed, each on a grid one window wider, and the mirror taps are
  slices of the same map: bitwise the per-tap result at 4/9 of the work (the centre is 0).
  """
  centre = ksize * ksize // 2     # also the number of taps after the centre
  h_wide, grid = _wide_grid(h, ksize)
  out = h.shape[:3] + (1,)

  def pair(j: jnp.ndarray, d: jnp.ndarray) -> jnp.ndarray:                   # E[q] = |h(q + off(t)) - h(q)|^2 on the padded grid
    t = centre + 1 + j
    diff = _pair_diff(h_wide, t, ksize, grid)
    e = feature_sum(diff * diff)
    d = jax.lax.dynamic_update_slice_in_dim(d, tap_slice(e, centre, ksize, out), t, 3)
    return jax.lax.dynamic_update_slice_in_dim(d, tap_slice(e, 2 * centre - t, ksize, out),
                                               2 * centre - t, 3)

  d = jnp.zeros(h.shape[:3] + (ksize * ksize,), accumulation_dtype(h.dtype))
  return for_each_tap(centre, pair, d)


@register_kernel("gaussian")
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gaussian_kernel(h: jnp.ndarray, ksize: int = 3) -> jnp.ndarray:
  """Official LSAC kernel: exp(-0.5 * ||h_q - h_p||^2). (N, H, W, Cg) -> (N, H, W, T).

  Its gradient keeps only h and k from the forward pass and is one pass over h (_gaussian_bwd).
  """
  return jnp.exp(-0.5 * squared_distances(h, ksize))


def _gaussian_fwd(h: jnp.ndarray, ksize: int) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
  k = gaussian_kernel(h, ksize)
  return k, (h, k)


def _gaussian_bwd(ksize: int, res: tuple[jnp.ndarray, jnp.ndarray],
                  dk: jnp.ndarray) -> tuple[jnp.ndarray]:
  """dh[q] = 2 sum_t c_t[q] (h[q] - h[q + off(t)]), c_t[q] = b_t[q] + b_mirror(t)[q + off(t)].

  b = dL/dd = -0.5 dk k. Each distance d_t[p] = |h[p + off(t)] - h[p]|^2 involves two pixels;
  gathering both of its terms at the pixel that receives them (the mirror tap's b seen from
  the neighbour) makes the gradient one fused pass that reads shifted windows of h and writes
  dh once, instead of scattering into a padded dh tap after tap.
  """
  h, k = after(res, dk)           # keep no forward copy alive
  acc, centre = accumulation_dtype(h.dtype), ksize * ksize // 2
  b, h_acc = (-0.5 * dk * k).astype(acc), h.astype(acc)
  b_pad, h_pad = pad_window(b, ksize), pad_window(h_acc, ksize)
  dh = jnp.zeros(h.shape, acc)
  for t, _, _ in window_offsets(ksize):
    if t != centre:
      mirror = 2 * centre - t
      c = b[..., t:t + 1] + tap_slice(b_pad, t, ksize, b.shape)[..., mirror:mirror + 1]
      dh = dh + c * (h_acc - tap_slice(h_pad, t, ksize, h.shape))
  return ((2 * dh).astype(h.dtype),)


gaussian_kernel.defvjp(_gaussian_fwd, _gaussian_bwd)


def inverse_kernel(h: jnp.ndarray, ksize: int = 3, alpha: jnp.ndarray | float = 0.0,
                   lam: jnp.ndarray | float = -1.0, eps: float = 1e-4) -> jnp.ndarray:
  """PAC paper's inverse kernel: alpha + (||h_q - h_p||^2 + eps)^(lam / 2).

  With lam < 0 the weight falls with feature distance like an inverse power.

  Args:
    h: (N, H, W, Cg) guidance features.
    ksize: the window's side.
    alpha, lam: the kernel's learnable scalars (the layer's parameters).
    eps: keeps the power finite at zero distance.
  """
  return alpha + jnp.power(squared_distances(h, ksize) + eps, 0.5 * lam)


@register_kernel("inverse", params={"inv_alpha": 0.0, "inv_lambda": -1.0})
def _learnable_inverse_kernel(h: jnp.ndarray, ksize: int, inv_alpha: jnp.ndarray,
                              inv_lambda: jnp.ndarray) -> jnp.ndarray:
  """inverse_kernel with alpha and lambda learnt (the official 'inv_*' PacConv2d's parameters)."""
  return inverse_kernel(h, ksize, inv_alpha, inv_lambda)
