"""Metrics against an independent NumPy transcription of the official util.py formulas."""
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from spadnet_jax import metrics


def _y(img):            # official rgb2ycbcr, float input in [0, 1], Y in [0, 1]
  return (img * 255.0 @ np.array([65.481, 128.553, 24.966]) / 255.0 + 16.0) / 255.0


def _psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 20 * np.log10(255.0 / np.sqrt(mse))


def _ssim(a, b):
  k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
  win = np.outer(k / k.sum(), k / k.sum())
  f = lambda x: np.einsum("ijkl,kl->ij", sliding_window_view(x, (11, 11)), win)
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  mu1, mu2 = f(a), f(b)
  s11, s22, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
  return np.mean(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s11 + s22 + c2)))


def _official(sr, hr, crop=8):
  a, b = _y(sr)[crop:-crop, crop:-crop] * 255, _y(hr)[crop:-crop, crop:-crop] * 255
  return _psnr(a, b), _ssim(a, b)


@pytest.fixture
def pair(rng):
  hr = rng.random((3, 48, 48, 3))
  sr = np.clip(hr + rng.normal(0, 0.05, hr.shape), -0.05, 1.05)   # float output, not clipped
  return sr.astype(np.float32), hr.astype(np.float32)


def test_psnr_and_ssim_match_official_formulas(pair):
  sr, hr = pair
  ours = metrics.image_metrics(jnp.asarray(sr), jnp.asarray(hr))
  for i in range(3):
    p, s = _official(sr[i].astype(np.float64), hr[i].astype(np.float64))
    assert float(ours["psnr_y"][i]) == pytest.approx(p, abs=2e-3)
    assert float(ours["ssim_y"][i]) == pytest.approx(s, abs=2e-4)
  rgb = _psnr(sr[0, 8:-8, 8:-8] * 255, hr[0, 8:-8, 8:-8] * 255)
  assert float(ours["psnr_rgb"][0]) == pytest.approx(rgb, abs=2e-3)


def test_identical_images_and_the_png_scoring_difference(pair):
  sr, hr = pair
  same = metrics.ssim(jnp.asarray(hr), jnp.asarray(hr))
  np.testing.assert_allclose(same, 1.0, atol=1e-5)
  flt = metrics.image_metrics(jnp.asarray(sr), jnp.asarray(hr), score="float")["psnr_y"]
  png = metrics.image_metrics(jnp.asarray(sr), jnp.asarray(hr), score="png")["psnr_y"]
  q = np.round(np.clip(sr, 0, 1) * 255) / 255
  assert float(png[0]) == pytest.approx(_official(q[0].astype(np.float64), hr[0].astype(np.float64))[0], abs=2e-3)
  assert not np.allclose(flt, png)          # the known difference: clipping + 8-bit rounding
  with pytest.raises(ValueError, match="unknown scoring mode 'jpeg'"):
    metrics.image_metrics(jnp.asarray(sr), jnp.asarray(hr), score="jpeg")


def test_y_channel_is_matlab_bt601():
  white, black = jnp.ones((1, 1, 1, 3)), jnp.zeros((1, 1, 1, 3))
  assert float(metrics.rgb_to_y(white)[0, 0, 0]) == pytest.approx(235.0, abs=1e-3)
  assert float(metrics.rgb_to_y(black)[0, 0, 0]) == pytest.approx(16.0)


def test_nme_of_group_centres():
  from spadnet_jax.data import landmarks as lmk, synthetic
  _, pts = synthetic.draw_face(1)
  gt = lmk.heatmaps(pts)[None]
  assert float(metrics.nme(jnp.asarray(gt), jnp.asarray(gt))[0]) == pytest.approx(0.0, abs=1e-4)
  shifted = lmk.heatmaps(pts + np.array([3.0, 0.0], np.float32))[None]
  iod = np.linalg.norm(pts[36:42].mean(0) - pts[42:48].mean(0))
  assert float(metrics.nme(jnp.asarray(shifted), jnp.asarray(gt))[0]) == pytest.approx(3.0 / iod, rel=0.05)
