"""pixel (un)shuffle and resampling matrices against slow independent loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import ops
from spadnet_jax.ops import resample


def test_pixel_unshuffle_official_channel_order(rng):
  x = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
  f = 4
  out = np.asarray(ops.pixel_unshuffle(jnp.asarray(x), f))
  assert out.shape == (2, 2, 3, 48)
  for y in range(2):
    for xx in range(3):
      for sy in range(f):
        for sx in range(f):
          for c in range(3):
            assert out[:, y, xx, (sy * f + sx) * 3 + c].tolist() == x[:, y * f + sy, xx * f + sx, c].tolist()


def test_pixel_shuffle_torch_channel_order(rng):
  x = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)  # C=2, f=2
  out = np.asarray(ops.pixel_shuffle(jnp.asarray(x), 2))
  assert out.shape == (1, 6, 4, 2)
  for y in range(6):
    for xx in range(4):
      for c in range(2):
        sy, sx = y % 2, xx % 2
        assert out[0, y, xx, c] == x[0, y // 2, xx // 2, c * 4 + sy * 2 + sx]


def test_shuffle_rejects_indivisible_sizes():
  with pytest.raises(ValueError, match="not divisible by 4"):
    ops.pixel_unshuffle(jnp.zeros((1, 6, 8, 3)), 4)
  with pytest.raises(ValueError, match="not divisible by 2"):
    ops.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def _torch_bicubic_loop(img: np.ndarray, factor: int) -> np.ndarray:
  """Per-pixel torch bicubic (align_corners=False, a=-0.75, clamped), 2-D single channel."""
  def w(t):
    a = -0.75
    t = abs(t)
    if t <= 1:
      return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
      return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0
  h, wd = img.shape
  out = np.zeros((h * factor, wd * factor))
  for i in range(h * factor):
    sy = (i + 0.5) / factor - 0.5
    by = math.floor(sy)
    for j in range(wd * factor):
      sx = (j + 0.5) / factor - 0.5
      bx = math.floor(sx)
      acc = 0.0
      for m in range(-1, 3):
        for n in range(-1, 3):
          yy = min(max(by + m, 0), h - 1)
          xx = min(max(bx + n, 0), wd - 1)
          acc += w(by + m - sy) * w(bx + n - sx) * img[yy, xx]
      out[i, j] = acc
  return out


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_upsample_matches_torch_formula(rng, factor):
  img = rng.random((5, 6)).astype(np.float32)
  ours = np.asarray(ops.bicubic_upsample(jnp.asarray(img)[None, :, :, None], factor))[0, :, :, 0]
  np.testing.assert_allclose(ours, _torch_bicubic_loop(img, factor), atol=2e-6)


def test_bicubic_upsample_matches_jax_bicubic_pytorch(rng):
  x = rng.random((2, 8, 8, 3)).astype(np.float32)
  ours = ops.bicubic_upsample(jnp.asarray(x), 4)
  ref = jax.image.resize(x, (2, 32, 32, 3), method="bicubic-pytorch", antialias=False)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bicubic_upsample_gradient_is_transpose(rng):
  x = jnp.asarray(rng.random((1, 4, 4, 1)).astype(np.float32))
  g = jax.grad(lambda v: jnp.sum(ops.bicubic_upsample(v, 2) * jnp.arange(64.0).reshape(1, 8, 8, 1)))(x)
  m = resample.resize_matrix(4, 8, "torch_bicubic")
  expected = m.T @ np.arange(64.0).reshape(8, 8) @ m
  np.testing.assert_allclose(g[0, :, :, 0], expected, rtol=1e-5)


def test_resize_rejects_unknown_method():
  with pytest.raises(ValueError, match="unknown resize method 'lanczos'"):
    resample.resize_matrix(4, 8, "lanczos")
