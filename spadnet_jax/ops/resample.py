"""Pixel (un)shuffle in PyTorch channel order and separable resampling by matrices.

Resampling is expressed as two small dense matrices (rows then columns) built once in
NumPy for fixed sizes, so it is exact, differentiable, jit-friendly and runs as matmuls.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np


def pixel_unshuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """(N, H, W, C) -> (N, H/f, W/f, f*f*C), channel index (sy*f + sx)*C + c.

  This is the order of the official SPADNet head (`DownBlock`), not torch's
  F.pixel_unshuffle (which puts the colour channel first).
  """
  n, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"pixel_unshuffle: spatial size {(h, w)} is not divisible by {factor}")
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // factor, w // factor, factor * factor * c)


def pixel_shuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """(N, H, W, C*f*f) -> (N, H*f, W*f, C), torch order: input channel c*f*f + sy*f + sx."""
  n, h, w, cff = x.shape
  if cff % (factor * factor):
    raise ValueError(f"pixel_shuffle: {cff} channels are not divisible by {factor}**2")
  c = cff // (factor * factor)
  x = x.reshape(n, h, w, c, factor, factor)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * factor, w * factor, c)


# ---------------------------------------------------------------------------
# Interpolation kernels.


def cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel; a=-0.75 is torch/OpenCV, a=-0.5 is MATLAB/PIL."""
  x = np.abs(x)
  x2, x3 = x * x, x * x * x
  near = (a + 2) * x3 - (a + 3) * x2 + 1
  far = a * x3 - 5 * a * x2 + 8 * a * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of torch F.interpolate(mode='bicubic', align_corners=False).

  Four taps per output with a=-0.75, border indices clamped, no antialiasing: the
  upsampler used inside SPADNet's SR branch.
  """
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    t = src - base
    for k in range(-1, 3):
      weight = cubic_kernel(np.array(k - t), -0.75)
      m[i, min(max(base + k, 0), in_size - 1)] += weight
  return m


def antialiased_matrix(in_size: int, out_size: int, kernel: Callable[[np.ndarray], np.ndarray],
                       support: float, border: str) -> np.ndarray:
  """(out, in) matrix of an antialiased resize (kernel stretched by the scale when shrinking).

  Args:
    in_size, out_size: the axis's length before and after.
    kernel: the interpolation kernel, taking distances in input pixels.
    support: the kernel's half-width at scale 1.
    border: 'clip' drops taps outside the image and renormalises (Pillow); 'symmetric'
      mirrors them back into the image (MATLAB imresize).
  """
  scale = out_size / in_size
  stretch = min(scale, 1.0)
  width = support / stretch
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    centre = (i + 0.5) / scale
    lo = math.floor(centre - width)
    hi = math.ceil(centre + width)
    taps = np.arange(lo, hi + 1)
    w = kernel((taps + 0.5 - centre) * stretch)
    if border == "clip":
      keep = (taps >= 0) & (taps < in_size)
      taps, w = taps[keep], w[keep]
    elif border == "symmetric":
      taps = np.where(taps < 0, -taps - 1, taps)
      taps = np.where(taps >= in_size, 2 * in_size - taps - 1, taps)
      taps = np.clip(taps, 0, in_size - 1)
    else:
      raise ValueError(f"unknown border mode {border!r}: use 'clip' or 'symmetric'")
    w = w / w.sum()
    np.add.at(m[i], taps, w)
  return m


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """Cached float32 (out, in) resampling matrix for `method`.

  Methods: 'torch_bicubic' (SPADNet's feature upsampler), 'pil_bicubic' (Pillow's
  Image.BICUBIC resize, the literature's LR kernel), 'matlab_bicubic' (MATLAB imresize).
  """
  if method == "torch_bicubic":
    m = torch_bicubic_matrix(in_size, out_size)
  elif method == "pil_bicubic":
    m = antialiased_matrix(in_size, out_size, lambda x: cubic_kernel(x, -0.5), 2.0, "clip")
  elif method == "matlab_bicubic":
    m = antialiased_matrix(in_size, out_size, lambda x: cubic_kernel(x, -0.5), 2.0, "symmetric")
  else:
    raise ValueError(f"unknown resize method {method!r}: use torch_bicubic, pil_bicubic or "
                     "matlab_bicubic")
  m = m.astype(np.float32)
  m.setflags(write=False)
  return m


def resize(x: Any, size: tuple[int, int], method: str, xp: types.ModuleType = jnp) -> Any:
  """Resize the two spatial axes of (..., H, W, C) `x` to `size` with `method`.

  Two matrix products (rows, then columns). `xp` is jax.numpy (default, traceable) or
  numpy (for the host-side data pipeline).
  """
  *lead, h, w, c = x.shape
  mh = resize_matrix(h, size[0], method)
  mw = resize_matrix(w, size[1], method)
  dtype = x.dtype if xp is jnp else np.float32
  y = xp.matmul(mh.astype(dtype), x.reshape(*lead, h, w * c)).reshape(*lead, size[0], w, c)
  return xp.matmul(mw.astype(dtype), y)


def bicubic_upsample(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """torch F.interpolate(x, scale_factor=factor, mode='bicubic') for NHWC `x`."""
  h, w = x.shape[1], x.shape[2]
  return resize(x, (h * factor, w * factor), "torch_bicubic")
