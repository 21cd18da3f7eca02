"""Pixel-adaptive convolution (PAC, Su et al. 2019), SPADNet's LSAC layer: formulations.

Input x (N, H, W, Cin), adaptive kernel k (N, H, W, T) from ops.pac_kernels, weight w
(ksize, ksize, Cin, Cout) as in a flax Conv, bias b (Cout,):

    out[n, p, o] = sum_{t, c} w[t, c, o] * k[n, p, t] * x_pad[n, p + off(t), c] + b[o]

x is zero-padded at the border, as the official code does. Every formulation computes the
same function; they differ in speed and memory per platform (docs/performance.md) and are
registered by name, so a new one is one decorated function and `--config.model.pac_impl`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spadnet_jax.ops.dispatch import by_platform
from spadnet_jax.ops.ordering import after
from spadnet_jax.ops.reduce import accumulation_dtype, channel_sum, feature_sum
from spadnet_jax.ops.windows import (crop_window, for_each_tap, pad_window, shift, tap_slice, unfold,
                                     window_offsets)
from spadnet_jax.registry import Registry

PacFormulation = Callable[..., jnp.ndarray]   # (x, k, w, b=None) -> (N, H, W, Cout)
PAC_IMPLS: Registry[PacFormulation] = Registry("PAC formulation")


def register_formulation(name: str) -> Callable[[PacFormulation], PacFormulation]:
  """Decorator: register fn(x, k, w, b) as PAC formulation `name` (model field pac_impl)."""
  return lambda fn: PAC_IMPLS.add(name, fn)


@register_formulation("einsum")
def pac_conv_einsum(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                    b: jnp.ndarray | None = None) -> jnp.ndarray:
  """Reference PAC: unfold x (a 9x copy of it), weight by k, contract with w in one einsum."""
  ksize = w.shape[0]
  cols = unfold(x, ksize)                               # (N, H, W, T, Cin)
  wt = w.reshape(ksize * ksize, w.shape[2], w.shape[3])  # (T, Cin, Cout)
  out = jnp.einsum("nhwtc,nhwt,tco->nhwo", cols, k, wt)
  return out if b is None else out + b


@register_formulation("shifted")
def pac_conv_shifted(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                     b: jnp.ndarray | None = None) -> jnp.ndarray:
  """PAC as a sum over taps of shifted, kernel-weighted 1x1 products (no unfolded copy)."""
  ksize = w.shape[0]
  out = None
  for t, dy, dx in window_offsets(ksize):
    term = jnp.einsum("nhwc,co->nhwo", shift(x, dy, dx) * k[..., t:t + 1],
                      w[dy + ksize // 2, dx + ksize // 2])
    out = term if out is None else out + term
  return out if b is None else out + b


@jax.custom_vjp
def pac_conv_fused(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                   b: jnp.ndarray | None = None) -> jnp.ndarray:
  """PAC as a loop over taps of kernel-weighted 1x1 products, with a hand-written gradient.

  Forward: out += k_t * (x_t @ w_t) for each tap, the product taken over one padded copy
  of x and sliced after, so no per-tap copy of x is made. Only (x, k, w) are kept for the
  backward pass: band by band of rows on CPU (_fused_bwd_banded), the einsum reference's
  wide products on GPUs and TPUs (_fused_bwd_unfolded).
  """
  ksize, acc = w.shape[0], accumulation_dtype(x.dtype)
  x_pad, wt = pad_window(x, ksize), jnp.asarray(w).reshape(ksize * ksize, *w.shape[2:])
  out_shape = x.shape[:3] + w.shape[3:]

  def tap(t: jnp.ndarray, out: jnp.ndarray) -> jnp.ndarray:                  # k_t scales rows, so it applies after the product
    y = jnp.einsum("nhwc,co->nhwo", x_pad, wt[t], preferred_element_type=acc)
    return out + tap_slice(y, t, ksize, out_shape) * jax.lax.dynamic_slice_in_dim(k, t, 1, 3)

  out = for_each_tap(ksize * ksize, tap, jnp.zeros(out_shape, acc))
  return (out if b is None else out + b).astype(x.dtype)


register_formulation("fused")(pac_conv_fused)


_Residuals = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray | None]
_Grads = tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray | None]


def _fused_fwd(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
               b: jnp.ndarray | None) -> tuple[jnp.ndarray, _Residuals]:
  return pac_conv_fused(x, k, w, b), (x, k, w, b)


def _fused_bwd(res: _Residuals, g: jnp.ndarray) -> _Grads:
  return by_platform(_fused_bwd_banded, _fused_bwd_unfolded, res, g)


def _fused_bwd_unfolded(res: _Residuals, g: jnp.ndarray) -> _Grads:
  """The accelerators' backward pass: the autodiff of pac_conv_einsum, whose wide products
  (one dout @ w^T over all taps, one weight gradient) keep matrix units busier than nine
  narrow products; memory is not what limits it there."""
  _, vjp = jax.vjp(pac_conv_einsum, *res)
  return vjp(g)


def band_rows(height: int, row_pixels: int, pixels: int = 1024) -> int:
  """The most rows (a divisor of height) of row_pixels each that fit one band, at least 1."""
  return max([r for r in range(1, height + 1) if height % r == 0 and r * row_pixels <= pixels] or [1])


def _fused_bwd_banded(res: _Residuals, g: jnp.ndarray, rows: int | None = None) -> _Grads:
  """The CPU backward pass: every gradient computed band by band of rows of the whole batch.

  A band (about 1024 pixels, `rows` rows of every image) is unfolded once, u = the nine
  shifted windows of x side by side (P, T, Cin), and serves all three gradients while it
  is in cache:
    dw^T += dout^T @ (u * k)                    one (Cout, P) x (P, T*Cin) product
    G = dout @ w_all^T                           one (P, Cout) x (Cout, T*Cin) product
    dk[p, t] = sum_c u[p, t, c] G[p, t, c]       (ops.feature_sum)
    dx[p + off(t)] += k[p, t] G[p, t]            nine in-place adds into the padded dx
  Bands span the whole batch, so a batch sharded across devices stays where it is.
  """
  x, k, w, b = res
  x, k, w = after((x, k, w), g)   # recompute the unfolded input; keep no forward copy alive
  ksize, acc = w.shape[0], accumulation_dtype(x.dtype)
  n, height, width, cin = x.shape
  ntaps, cout = ksize * ksize, w.shape[-1]
  x_pad, w_all = pad_window(x, ksize), w.reshape(ntaps * cin, cout)
  rows = rows or band_rows(height, n * width)
  r, taps = ksize // 2, list(window_offsets(ksize))

  def band(i: jnp.ndarray, carry: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]
           ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    dx_pad, dk, dw_t = carry
    top = i * rows
    xs = jax.lax.dynamic_slice(x_pad, (0, top, 0, 0), (n, rows + ksize - 1, x_pad.shape[2], cin))
    ks = jax.lax.dynamic_slice(k, (0, top, 0, 0), (n, rows, width, ntaps))[..., None]
    gs = jax.lax.dynamic_slice(g, (0, top, 0, 0), (n, rows, width, cout)).reshape(-1, cout)
    u = jnp.stack([xs[:, r + dy:r + dy + rows, r + dx:r + dx + width] for _, dy, dx in taps], 3)
    dw_t = dw_t + jnp.matmul(gs.T, (u * ks).reshape(-1, ntaps * cin), preferred_element_type=acc)
    grad = jnp.matmul(gs, w_all.T, preferred_element_type=acc).reshape(u.shape)
    dk = jax.lax.dynamic_update_slice(dk, feature_sum(u * grad)[..., 0], (0, top, 0, 0))
    kg = grad * ks
    for t, dy, dx in taps:
      start = (0, top + r + dy, r + dx, 0)
      window = jax.lax.dynamic_slice(dx_pad, start, kg.shape[:3] + (cin,))
      dx_pad = jax.lax.dynamic_update_slice(dx_pad, window + kg[:, :, :, t], start)
    return dx_pad, dk, dw_t

  init = after((jnp.zeros(x_pad.shape, acc), jnp.zeros(k.shape, acc),
                jnp.zeros((cout, ntaps * cin), acc)), g)
  dx_pad, dk, dw_t = jax.lax.fori_loop(0, height // rows, band, init)
  db = None if b is None else channel_sum(g).astype(b.dtype)
  return (crop_window(dx_pad, ksize).astype(x.dtype), dk.astype(k.dtype),
          dw_t.T.reshape(w.shape).astype(w.dtype), db)


pac_conv_fused.defvjp(_fused_fwd, _fused_bwd)


@register_formulation("auto")
def pac_conv_auto(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                  b: jnp.ndarray | None = None) -> jnp.ndarray:
  """Per platform (docs/performance.md): 'fused' on CPU and 'einsum' on GPUs, the fastest
  measured; 'shifted' on TPUs, whose compiled train step holds no unfolded input (a third
  less memory than 'einsum's). The models' and pac_conv's default."""
  return by_platform(pac_conv_fused, pac_conv_einsum, x, k, w, b, tpu=pac_conv_shifted)


def pac_conv(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None = None,
             impl: str = "auto") -> jnp.ndarray:
  """Pixel-adaptive convolution with the registered formulation named by `impl`.

  Args:
    x: (N, H, W, Cin) input.
    k: (N, H, W, T) per-pixel kernel, T = ksize * ksize taps.
    w: (ksize, ksize, Cin, Cout) weights.
    b: (Cout,) bias, or None.
    impl: a registered formulation (PAC_IMPLS); all give the same outputs.
  """
  return PAC_IMPLS.lookup(impl)(x, k, w, b)
