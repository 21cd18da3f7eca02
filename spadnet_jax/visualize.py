"""Pictures for people: comparison grids, heatmap overlays and atomic PNG writing."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from spadnet_jax.storage import files

GROUP_COLOURS = np.array([[1, .2, .2], [.2, .4, 1], [.2, .9, .2], [1, .8, 0], [.9, .3, 1]],
                         np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
  """[0, 1] float image -> uint8, clipped then rounded (how SR PNGs are saved)."""
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
  """Blend the coloured heatmap groups over a dimmed copy of the image (all [0, 1])."""
  colour = np.clip(np.maximum(heatmap, 0) @ GROUP_COLOURS[:heatmap.shape[-1]], 0, 1)
  alpha = np.clip(np.maximum(heatmap, 0).sum(-1, keepdims=True), 0, 1)
  return 0.5 * image * (1 - alpha) + colour * alpha + 0.5 * image * alpha


def comparison_row(lr: np.ndarray, lr_up: np.ndarray, sr: np.ndarray, hr: np.ndarray,
                   heatmap: np.ndarray | None = None) -> np.ndarray:
  """LR (nearest) | bicubic | SR | HR | heatmap overlay, side by side, (H, k*W, 3).

  Args:
    lr: the (h, w, 3) LR input, enlarged by nearest neighbour.
    lr_up: its bicubic upsampling (the network input).
    sr: the network's output (clipped to [0, 1]).
    hr: the ground truth.
    heatmap: the predicted (H, W, 5) heatmaps, overlaid on the HR, or None.
  """
  size = hr.shape[0]
  lr = np.repeat(np.repeat(lr, size // lr.shape[0], axis=0), size // lr.shape[1], axis=1)
  cols = [lr, lr_up, np.clip(sr, 0, 1), hr]
  if heatmap is not None:
    cols.append(heatmap_overlay(hr, heatmap))
  return np.concatenate(cols, axis=1)


def image_grid(images: dict[str, np.ndarray]) -> np.ndarray:
  """Rows of comparison_row for a batch, as (1, H, W, 3) for TensorBoard."""
  hm = images.get("heatmap")
  rows = [comparison_row(images["lr"][i], images["lr_up"][i], images["sr"][i], images["hr"][i],
                         None if hm is None else hm[i]) for i in range(len(images["hr"]))]
  return np.concatenate(rows, axis=0)[None]


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
  """Write a [0, 1] float or uint8 image as PNG via a temporary file (never half-written)."""
  data = image if image.dtype == np.uint8 else to_uint8(image)
  with files.atomic_path(path) as tmp:
    Image.fromarray(data).save(tmp, format="PNG")
