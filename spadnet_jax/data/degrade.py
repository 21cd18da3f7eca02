"""LR synthesis for face SR: HR -> LR -> network input (LR upsampled back to HR size).

'pil' (default) is Pillow's bicubic resize (a=-0.5, antialiased, clipped borders), the
kernel of DIC, SPARNet and SFMNet; 'matlab' is MATLAB imresize (a=-0.5, antialiased,
symmetric borders). Both run as two small matrix products per image.
"""
from __future__ import annotations

import numpy as np

from spadnet_jax.ops import resample

KERNELS = {"pil": "pil_bicubic", "matlab": "matlab_bicubic"}


def _method(kernel: str) -> str:
  try:
    return KERNELS[kernel]
  except KeyError:
    raise ValueError(f"unknown LR kernel {kernel!r}: use one of {sorted(KERNELS)}") from None


def resize(image: np.ndarray, size: int, kernel: str = "pil") -> np.ndarray:
  """(H, W, C) float image -> (size, size, C) float32 with the named bicubic kernel."""
  return resample.resize(np.asarray(image, np.float32), (size, size), _method(kernel), xp=np)


def degrade(hr: np.ndarray, scale: int, kernel: str = "pil") -> tuple[np.ndarray, np.ndarray]:
  """HR (H, W, 3) in [0, 1] -> (lr (H/s, W/s, 3), lr_up (H, W, 3)), both clipped to [0, 1].

  lr is quantised to 8 bits as an LR image file would be; lr_up is lr resized back with
  the same kernel (SFMNet's network input).
  """
  h = hr.shape[0]
  if h % scale:
    raise ValueError(f"image size {h} is not divisible by scale {scale}")
  lr = np.clip(resize(hr, h // scale, kernel), 0.0, 1.0)
  lr = np.round(lr * 255.0).astype(np.float32) / 255.0
  lr_up = np.clip(resize(lr, h, kernel), 0.0, 1.0)
  return lr, lr_up
