"""68-point landmarks: heatmap groups, Gaussian heatmaps and geometric transforms.

Coordinates are (x, y) in pixels of the 128x128 HR image, pixel centres at integers,
the convention of the official heatmaps (exp(-d^2 / 2 sigma^2) on the integer grid).
"""
from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 68
# Channel order of the heatmap output: left eye, right eye, nose, mouth, contour+brows.
GROUPS: tuple[tuple[int, ...], ...] = (
    tuple(range(36, 42)), tuple(range(42, 48)), tuple(range(27, 36)), tuple(range(48, 68)),
    tuple(range(0, 27)))
GROUP_NAMES = ("left_eye", "right_eye", "nose", "mouth", "contour_brows")


def _mirror_permutation() -> np.ndarray:
  """Index map of the iBUG 68-point scheme under a horizontal flip."""
  perm = np.arange(NUM_LANDMARKS)
  pairs = [(i, 16 - i) for i in range(17)]                         # jaw line
  pairs += [(17 + i, 26 - i) for i in range(5)]                    # brows
  pairs += [(31 + i, 35 - i) for i in range(5)]                    # nostrils
  pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
  pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]      # outer lip
  pairs += [(60, 64), (61, 63), (65, 67)]                          # inner lip
  for a, b in pairs:
    perm[a], perm[b] = b, a
  return perm


MIRROR = _mirror_permutation()


def heatmaps(landmarks: np.ndarray, size: int = 128, sigma: float = 1.0,
             groups: tuple[tuple[int, ...], ...] = GROUPS, valid: np.ndarray | None = None) -> np.ndarray:
  """(L, 2) landmarks -> (size, size, len(groups)) float32 sums of unnormalised Gaussians.

  Separable: each group is gy^T @ gx over its landmarks, so 68 Gaussians cost five small
  matrix products instead of 68 full-image exponentials.

  Args:
    landmarks: (L, 2) [x, y] in pixels, pixel centres at integers.
    size: the heatmaps' side.
    sigma: the Gaussians' standard deviation in pixels.
    groups: landmark indices summed into each channel (GROUPS: the official five).
    valid: (L,) mask; False landmarks are left out.
  """
  grid = np.arange(size, dtype=np.float32)
  lm = np.asarray(landmarks, np.float32)
  gx = np.exp(-np.square(grid[None, :] - lm[:, :1]) / (2 * sigma * sigma))   # (L, size)
  gy = np.exp(-np.square(grid[None, :] - lm[:, 1:]) / (2 * sigma * sigma))
  if valid is not None:
    gx = gx * np.asarray(valid, np.float32)[:, None]
  out = np.zeros((size, size, len(groups)), np.float32)
  for g, idx in enumerate(groups):
    idx = [i for i in idx if i < len(lm)]
    if idx:
      out[:, :, g] = gy[idx].T @ gx[idx]
  return out


def hflip(image: np.ndarray, landmarks: np.ndarray,
          mirror: np.ndarray = MIRROR) -> tuple[np.ndarray, np.ndarray]:
  """Mirror an (H, W, C) image and its landmarks; relabels points so left stays left."""
  w = image.shape[1]
  lm = np.asarray(landmarks, np.float32).copy()
  lm[:, 0] = (w - 1) - lm[:, 0]
  return image[:, ::-1], lm[mirror]


def rot90(image: np.ndarray, landmarks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Rotate image and landmarks by k*90 degrees counter-clockwise (np.rot90 on H, W)."""
  lm = np.asarray(landmarks, np.float32).copy()
  for _ in range(k % 4):
    w = image.shape[1]
    lm = np.stack([lm[:, 1], (w - 1) - lm[:, 0]], axis=1)
    image = np.rot90(image, 1, axes=(0, 1))
  return image, lm
