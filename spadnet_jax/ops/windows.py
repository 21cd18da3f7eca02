"""Sliding-window plumbing shared by the PAC kernels and formulations (NHWC, zero border).

A ksize x ksize window has T = ksize*ksize taps in row-major order: tap t = (dy+r)*ksize +
(dx+r) for offset (dy, dx), r = ksize//2.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from spadnet_jax.ops.dispatch import by_platform


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


def pad_window(x: jnp.ndarray, ksize: int) -> jnp.ndarray:
  """Zero-pad H and W by ksize // 2 once, so every tap is a slice of one array."""
  r = ksize // 2
  return jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))


def crop_window(x_pad: jnp.ndarray, ksize: int) -> jnp.ndarray:
  """Inverse of pad_window: the unpadded interior."""
  r = ksize // 2
  return x_pad[:, r:x_pad.shape[1] - r, r:x_pad.shape[2] - r]


def tap_slice(x_pad: jnp.ndarray, t: jnp.ndarray | int, ksize: int,
              shape: tuple[int, ...]) -> jnp.ndarray:
  """Tap t's shifted view of x (x_pad[:, y + dy, x + dx]) for a possibly traced tap index t."""
  return jax.lax.dynamic_slice(x_pad, (0, t // ksize, t % ksize, 0), shape)


def _unrolled_taps(ntaps: int, body: Callable, init: Any) -> Any:
  for t in range(ntaps):
    init = body(t, init)
  return init


def _looped_taps(ntaps: int, body: Callable, init: Any) -> Any:
  return jax.lax.fori_loop(0, ntaps, body, init)


def for_each_tap(ntaps: int, body: Callable, init: Any) -> Any:
  """carry = body(t, carry) for t in range(ntaps): a lax.fori_loop on CPU (one tap's
  temporaries alive at a time), unrolled on GPUs and TPUs (no host sync per iteration)."""
  return by_platform(functools.partial(_looped_taps, ntaps, body),
                     functools.partial(_unrolled_taps, ntaps, body), init)
