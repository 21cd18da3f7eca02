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
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from spadnet_jax.ops.dispatch import by_platform
from spadnet_jax.ops.ordering import after
from spadnet_jax.ops.reduce import accumulation_dtype, channel_sum, feature_sum


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


def _pad_window(x: jnp.ndarray, ksize: int) -> jnp.ndarray:
  """Zero-pad H and W by ksize // 2 once, so every tap is a slice of one array."""
  r = ksize // 2
  return jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))


def _crop_window(x_pad: jnp.ndarray, ksize: int) -> jnp.ndarray:
  """Inverse of _pad_window: the unpadded interior."""
  r = ksize // 2
  return x_pad[:, r:x_pad.shape[1] - r, r:x_pad.shape[2] - r]


def _tap_start(t: jnp.ndarray, ksize: int) -> tuple:
  """Where tap t's window starts in the padded array (row-major tap order)."""
  return (0, t // ksize, t % ksize, 0)


def _tap_slice(x_pad: jnp.ndarray, t: jnp.ndarray, ksize: int, shape: tuple[int, ...]) -> jnp.ndarray:
  """Tap t's shifted view of x (x_pad[:, y + dy, x + dx]) for a traced tap index t."""
  return jax.lax.dynamic_slice(x_pad, _tap_start(t, ksize), shape)


def _unrolled_taps(ntaps: int, body: Callable, init: Any) -> Any:
  for t in range(ntaps):
    init = body(t, init)
  return init


def _looped_taps(ntaps: int, body: Callable, init: Any) -> Any:
  return jax.lax.fori_loop(0, ntaps, body, init)


def _for_each_tap(ntaps: int, body: Callable, init: Any) -> Any:
  """carry = body(t, carry) for t in range(ntaps): a lax.fori_loop on CPU, unrolled elsewhere.

  On XLA:CPU the loop keeps one tap's temporaries alive at a time; unrolled, XLA ran all
  nine concurrently, 3x slower and with several times the memory. On a GPU the unrolled
  taps ran 1.75x faster (a while loop there syncs with the host every iteration).
  """
  return by_platform(functools.partial(_looped_taps, ntaps, body),
                     functools.partial(_unrolled_taps, ntaps, body), init)


def _wide_grid(h: jnp.ndarray, ksize: int) -> tuple[jnp.ndarray, tuple[int, ...]]:
  """h zero-padded by a whole window (2r), and the shape of its once-padded pixel grid q."""
  r = ksize // 2
  h_wide = jnp.pad(h, ((0, 0), (2 * r, 2 * r), (2 * r, 2 * r), (0, 0)))
  return h_wide, (h.shape[0], h.shape[1] + 2 * r, h.shape[2] + 2 * r, h.shape[3])


def _pair_diff(h_wide: jnp.ndarray, t: jnp.ndarray, ksize: int, grid: tuple[int, ...]) -> jnp.ndarray:
  """h(q + off(t)) - h(q) over the grid, in float32 or wider: shared by tap t and its mirror."""
  centre = ksize * ksize // 2
  return (_tap_slice(h_wide, t, ksize, grid) - _tap_slice(h_wide, centre, ksize, grid)).astype(
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

  def pair(j, d):                   # E[q] = |h(q + off(t)) - h(q)|^2 on the padded grid
    t = centre + 1 + j
    diff = _pair_diff(h_wide, t, ksize, grid)
    e = feature_sum(diff * diff)
    d = jax.lax.dynamic_update_slice_in_dim(d, _tap_slice(e, centre, ksize, out), t, 3)
    return jax.lax.dynamic_update_slice_in_dim(d, _tap_slice(e, 2 * centre - t, ksize, out),
                                               2 * centre - t, 3)

  d = jnp.zeros(h.shape[:3] + (ksize * ksize,), accumulation_dtype(h.dtype))
  return _for_each_tap(centre, pair, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gaussian_kernel(h: jnp.ndarray, ksize: int = 3) -> jnp.ndarray:
  """Official LSAC kernel: exp(-0.5 * ||h_q - h_p||^2). (N, H, W, Cg) -> (N, H, W, T).

  Its gradient keeps only h and k from the forward pass and is one pass over h (_gaussian_bwd).
  """
  return jnp.exp(-0.5 * squared_distances(h, ksize))


def _gaussian_fwd(h, ksize):
  k = gaussian_kernel(h, ksize)
  return k, (h, k)


def _gaussian_bwd(ksize, res, dk):
  """dh[q] = 2 sum_t c_t[q] (h[q] - h[q + off(t)]), c_t[q] = b_t[q] + b_mirror(t)[q + off(t)].

  b = dL/dd = -0.5 dk k. Each distance d_t[p] = |h[p + off(t)] - h[p]|^2 involves two pixels;
  gathering both of its terms at the pixel that receives them (the mirror tap's b seen from
  the neighbour) makes the gradient one fused pass that reads shifted windows of h and writes
  dh once, instead of scattering into a padded dh tap after tap: the kernel's forward +
  backward at 8x64x64x64 took half the time on the 2-core CPU (17.6 -> 9.1 ms, interleaved).
  """
  h, k = after(res, dk)           # keep no forward copy alive
  acc, centre = accumulation_dtype(h.dtype), ksize * ksize // 2
  b, h_acc = (-0.5 * dk * k).astype(acc), h.astype(acc)
  b_pad, h_pad = _pad_window(b, ksize), _pad_window(h_acc, ksize)
  dh = jnp.zeros(h.shape, acc)
  for t, _, _ in window_offsets(ksize):
    if t != centre:
      mirror = 2 * centre - t
      c = b[..., t:t + 1] + _tap_slice(b_pad, t, ksize, b.shape)[..., mirror:mirror + 1]
      dh = dh + c * (h_acc - _tap_slice(h_pad, t, ksize, h.shape))
  return ((2 * dh).astype(h.dtype),)


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
  """PAC as a loop over taps of kernel-weighted 1x1 products, with a hand-written gradient.

  Forward: out += k_t * (x_t @ w_t) for each tap, the product taken over one padded copy
  of x and sliced after (a contiguous operand: no per-tap copy of x, 6% more rows at 64x64).
  Only (x, k, w) are kept for the backward pass. Backward on CPU: all gradients band of
  rows by band from one unfolded band of x (_fused_bwd_banded), one band's temporaries
  alive at a time. On GPUs and TPUs the backward pass is the einsum reference's: one wide
  dout @ w^T for all taps instead of nine narrow products (4.9x -> 3.9x a conv's time on
  an H100). The models' default on CPU (pac_conv_auto).
  """
  ksize, acc = w.shape[0], accumulation_dtype(x.dtype)
  x_pad, wt = _pad_window(x, ksize), jnp.asarray(w).reshape(ksize * ksize, *w.shape[2:])
  out_shape = x.shape[:3] + w.shape[3:]

  def tap(t, out):                  # k_t scales rows, so it applies after the product
    y = jnp.einsum("nhwc,co->nhwo", x_pad, wt[t], preferred_element_type=acc)
    return out + _tap_slice(y, t, ksize, out_shape) * jax.lax.dynamic_slice_in_dim(k, t, 1, 3)

  out = _for_each_tap(ksize * ksize, tap, jnp.zeros(out_shape, acc))
  return (out if b is None else out + b).astype(x.dtype)


def _fused_fwd(x, k, w, b):
  return pac_conv_fused(x, k, w, b), (x, k, w, b)


def _fused_bwd(res, g):
  return by_platform(_fused_bwd_banded, _fused_bwd_unfolded, res, g)


def _fused_bwd_unfolded(res, g):
  """The accelerators' backward pass: the autodiff of pac_conv_einsum, whose wide products
  (one dout @ w^T over all taps, one weight gradient) keep a GPU's matrix units busier than
  nine products with 64 output columns each; memory is not what limits it there."""
  _, vjp = jax.vjp(pac_conv_einsum, *res)
  return vjp(g)


def _band_rows(height: int, row_pixels: int, pixels: int = 1024) -> int:
  """The most rows (a divisor of height) of row_pixels each that fit one band, at least 1."""
  return max([r for r in range(1, height + 1) if height % r == 0 and r * row_pixels <= pixels] or [1])


def _fused_bwd_banded(res, g, rows: int | None = None):
  """The CPU backward pass: every gradient computed band by band of rows of the whole batch.

  A band (about 1024 pixels, `rows` rows of every image) is unfolded once, u = the nine
  shifted windows of x side by side (P, T, Cin), in the input's own layout, and serves all
  three gradients while it is in cache:
    dw^T += dout^T @ (u * k)                    one (Cout, P) x (P, T*Cin) product
    G = dout @ w_all^T                           one (P, Cout) x (Cout, T*Cin) product
    dk[p, t] = sum_c u[p, t, c] G[p, t, c]       (ops.feature_sum)
    dx[p + off(t)] += k[p, t] G[p, t]            nine in-place adds into the padded dx
  The loop over taps it replaces ran nine narrow products over the whole batch, going to
  memory for every tap: with the bands the layer's forward + backward took 0.80-0.94x its
  time (8x64x64x64, five interleaved runs) and 0.75x its compiled temporaries. Bands span
  the whole batch, so a batch sharded across devices stays where it is.
  """
  x, k, w, b = res
  x, k, w = after((x, k, w), g)   # recompute the unfolded input; keep no forward copy alive
  ksize, acc = w.shape[0], accumulation_dtype(x.dtype)
  n, height, width, cin = x.shape
  ntaps, cout = ksize * ksize, w.shape[-1]
  x_pad, w_all = _pad_window(x, ksize), w.reshape(ntaps * cin, cout)
  rows = rows or _band_rows(height, n * width)
  r, taps = ksize // 2, list(window_offsets(ksize))

  def band(i, carry):
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
  return (_crop_window(dx_pad, ksize).astype(x.dtype), dk.astype(k.dtype),
          dw_t.T.reshape(w.shape).astype(w.dtype), db)


pac_conv_fused.defvjp(_fused_fwd, _fused_bwd)


def pac_conv_auto(x: jnp.ndarray, k: jnp.ndarray, w: jnp.ndarray,
                  b: jnp.ndarray | None = None) -> jnp.ndarray:
  """The fastest measured formulation per platform: 'fused' on CPU, 'einsum' on GPUs and TPUs.

  benchmarks/run.py --cases pac (64x64x64, forward + backward, time over a plain conv's):
  on the 2-core CPU, fused 1.6-1.9x and einsum 2.9-3.4x (with 8x fused's temporaries);
  on an H100 (bf16, batch 64), einsum 2.8x and fused 3.9x: there fused's nine narrow
  products (64 output columns each) and its recomputation of the unfolded input in the
  backward pass cost more than einsum's 9x copy, and memory is not what limits the layer.
  The models' default.
  """
  return by_platform(pac_conv_fused, pac_conv_einsum, x, k, w, b)


KERNELS: dict[str, Callable[..., jnp.ndarray]] = {
    "gaussian": gaussian_kernel,
    "inverse": inverse_kernel,
}

PAC_IMPLS: dict[str, Callable[..., jnp.ndarray]] = {
    "auto": pac_conv_auto,
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
