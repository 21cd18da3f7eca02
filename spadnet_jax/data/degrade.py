"""LR synthesis for face SR: HR -> LR -> network input (LR upsampled back to HR size).

'pil' (default) makes the LR image as the literature made its LR PNGs (DIC, SPARNet,
SFMNet): Pillow's own bicubic resize of the 8-bit HR image, an 8-bit result. 'matlab' is
MATLAB imresize (a=-0.5, antialiased, symmetric borders), quantised to 8 bits too. The
network input is the LR image resized back with the same kernel in float (`resize`: two
small matrix products per image; 'pil' is Pillow's kernel, a=-0.5, antialiased, clipped
borders).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

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

  lr is 8-bit, as an LR image file is ('pil': Pillow's resize of the 8-bit HR itself);
  lr_up is lr resized back with the same kernel (SFMNet's network input).
  """
  h = hr.shape[0]
  if h % scale:
    raise ValueError(f"image size {h} is not divisible by scale {scale}")
  if _method(kernel) == "pil_bicubic":
    hr8 = np.round(np.clip(hr, 0.0, 1.0) * 255.0).astype(np.uint8)
    lr8 = Image.fromarray(hr8).resize((h // scale, h // scale), Image.BICUBIC)
    lr = np.asarray(lr8, np.float32) / 255.0
  else:
    lr = np.clip(resize(hr, h // scale, kernel), 0.0, 1.0)
    lr = np.round(lr * 255.0).astype(np.float32) / 255.0
  lr_up = np.clip(resize(lr, h, kernel), 0.0, 1.0)
  return lr, lr_up
