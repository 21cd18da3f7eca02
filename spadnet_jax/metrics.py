"""Face-SR metrics as the official util.py computes them, in jit-friendly JAX.

PSNR and SSIM on the luma channel of MATLAB's rgb2ycbcr (ITU-R BT.601, Y in [16, 235]),
after cropping `crop` pixels at every border; SSIM with an 11x11 Gaussian window
(sigma 1.5), 'valid' filtering, C1 = (0.01*255)^2, C2 = (0.03*255)^2. All functions take
(N, H, W, 3) RGB in [0, 1] and return one value per image, so padded examples can be
masked out before averaging.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(img: jnp.ndarray) -> jnp.ndarray:
  """MATLAB rgb2ycbcr luma on the 0..255 scale: (N, H, W, 3) in [0, 1] -> (N, H, W)."""
  return 16.0 + img @ jnp.asarray(Y_WEIGHTS, img.dtype)


def quantize(img: jnp.ndarray) -> jnp.ndarray:
  """What an 8-bit PNG of `img` holds: clip to [0, 1], round to 1/255 steps."""
  return jnp.round(jnp.clip(img, 0.0, 1.0) * 255.0) / 255.0


def _crop(x: jnp.ndarray, crop: int) -> jnp.ndarray:
  return x[:, crop:x.shape[1] - crop, crop:x.shape[2] - crop] if crop else x


def psnr(pred: jnp.ndarray, target: jnp.ndarray, crop: int = 8, channel: str = "y") -> jnp.ndarray:
  """Per-image PSNR (dB, peak 255) on 'y' (luma) or 'rgb' (all three channels)."""
  if channel == "y":
    a, b = rgb_to_y(pred), rgb_to_y(target)
  elif channel == "rgb":
    a, b = pred * 255.0, target * 255.0
  else:
    raise ValueError(f"unknown PSNR channel {channel!r}: use 'y' or 'rgb'")
  diff = _crop(a, crop) - _crop(b, crop)
  mse = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)
  return 20.0 * jnp.log10(255.0) - 10.0 * jnp.log10(mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian (OpenCV's getGaussianKernel for these arguments)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-x * x / (2 * sigma * sigma))
  return (w / w.sum()).astype(np.float32)


def _filter_valid(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Separable 'valid' filtering of (N, H, W) with the 1-D window w along H and W."""
  k = w.shape[0]
  h, wd = x.shape[1] - k + 1, x.shape[2] - k + 1
  rows = sum(w[i] * x[:, i:i + h, :] for i in range(k))
  return sum(w[j] * rows[:, :, j:j + wd] for j in range(k))


def ssim(pred: jnp.ndarray, target: jnp.ndarray, crop: int = 8) -> jnp.ndarray:
  """Per-image SSIM on the luma channel (official formula, see the module docstring)."""
  a, b = _crop(rgb_to_y(pred), crop), _crop(rgb_to_y(target), crop)
  w = jnp.asarray(gaussian_window())
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
  var_a = _filter_valid(a * a, w) - mu_a ** 2
  var_b = _filter_valid(b * b, w) - mu_b ** 2
  cov = _filter_valid(a * b, w) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s.reshape(s.shape[0], -1), axis=1)


def heatmap_centres(heatmap: jnp.ndarray) -> jnp.ndarray:
  """(N, H, W, G) heatmaps -> (N, G, 2) (x, y) centres of mass of the part of each map
  above half its maximum (robust to low background noise in predicted maps)."""
  peak = jnp.max(heatmap, axis=(1, 2), keepdims=True)
  h = jnp.maximum(heatmap - 0.5 * peak, 0.0)
  total = jnp.sum(h, axis=(1, 2)) + 1e-8
  ys = jnp.arange(h.shape[1], dtype=h.dtype)[None, :, None, None]
  xs = jnp.arange(h.shape[2], dtype=h.dtype)[None, None, :, None]
  return jnp.stack([jnp.sum(h * xs, axis=(1, 2)) / total, jnp.sum(h * ys, axis=(1, 2)) / total], -1)


def nme(pred_heatmap: jnp.ndarray, gt_heatmap: jnp.ndarray, groups: int = 4) -> jnp.ndarray:
  """Per-image landmark error: mean distance between predicted and true centres of the
  first `groups` heatmap groups (eyes, nose, mouth), over the inter-ocular distance."""
  p = heatmap_centres(pred_heatmap[..., :groups])
  g = heatmap_centres(gt_heatmap[..., :groups])
  iod = jnp.linalg.norm(g[:, 0] - g[:, 1], axis=-1) + 1e-8
  return jnp.mean(jnp.linalg.norm(p - g, axis=-1), axis=-1) / iod


def image_metrics(sr: jnp.ndarray, hr: jnp.ndarray, crop: int = 8,
                  score: str = "float") -> dict[str, jnp.ndarray]:
  """psnr_y, ssim_y and psnr_rgb per image. score='float' scores the raw output (the
  official code); 'png' scores the 8-bit image a saved PNG would hold."""
  if score == "png":
    sr = quantize(sr)
  elif score != "float":
    raise ValueError(f"unknown scoring mode {score!r}: use 'float' or 'png'")
  return {"psnr_y": psnr(sr, hr, crop, "y"), "ssim_y": ssim(sr, hr, crop),
          "psnr_rgb": psnr(sr, hr, crop, "rgb")}


def protocol(score: str, crop: int = 8) -> str:
  """One line saying how the metrics above were computed, for every report."""
  scored = "float network output (official)" if score == "float" else "8-bit PNG"
  return (f"PSNR/SSIM on Y (ITU-R BT.601, MATLAB rgb2ycbcr) and PSNR on RGB, border {crop} px "
          f"cropped, SSIM 11x11 Gaussian sigma 1.5 (the official util.py / SFMNet-DIC protocol); "
          f"NME: heatmap group centres over the inter-ocular distance; scoring the {scored}")
