"""Where a face sits: the literature's square crop, the aligned frame, warps and paste-back.

Landmarks keep the data's convention (pixel centres at integers). Boxes and affine maps use
pixel edges (pixel i spans [i, i + 1]), as Pillow's resize boxes and transforms do; an
affine map is a (2, 3) array taking source edge coordinates to destination ones.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]   # x0, y0, x1, y1 in pixel edges
EXPAND = 0.3   # DIC's crop: 30% of the square's side added, half on each side
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)


def landmark_box(points: np.ndarray) -> Box:
  """The tight box through the outermost points' pixel centres (so it maps with the points)."""
  p = np.asarray(points, np.float64) + 0.5
  (x0, y0), (x1, y1) = p.min(0), p.max(0)
  return float(x0), float(y0), float(x1), float(y1)


def square_box(box: Box, side: str = "short", expand: float = EXPAND) -> Box:
  """A square centred on `box`, as long as its shorter ('short', DIC's rule for CelebA's
  annotated boxes) or longer ('long', for landmark boxes) side, enlarged by `expand`."""
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  if side not in ("short", "long"):
    raise ValueError(f"side must be 'short' or 'long', not {side!r}")
  s = (min(w, h) if side == "short" else max(w, h)) * (1.0 + expand)
  cx, cy = x0 + w / 2, y0 + h / 2
  return cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2


def clip_box(box: Box, width: int, height: int) -> Box:
  """`box` cut to the image (DIC clips its crops the same way, so border crops are not square)."""
  x0, y0, x1, y1 = box
  return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def box_points(points: np.ndarray, box: Box, size: int) -> np.ndarray:
  """Landmarks of a photo in the frame of `box` resized to size x size."""
  x0, y0, x1, y1 = box
  scale = np.array([size / (x1 - x0), size / (y1 - y0)], np.float32)
  return (np.asarray(points, np.float32) - np.array([x0, y0], np.float32) + 0.5) * scale - 0.5


def crop(image: Image.Image, box: Box, size: int) -> np.ndarray:
  """The box resized to size x size with Pillow's bicubic (antialiased), as DIC crops."""
  return np.asarray(image.resize((size, size), Image.BICUBIC, box=tuple(box)), np.uint8)


def rotation(angle: float) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[c, -s], [s, c]])


def affine(linear: np.ndarray, shift: np.ndarray | tuple[float, float]) -> np.ndarray:
  return np.concatenate([np.asarray(linear, np.float64), np.asarray(shift, np.float64)[:, None]], 1)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
  """outer after inner."""
  return affine(outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2] + outer[:, 2])


def invert(a: np.ndarray) -> np.ndarray:
  inv = np.linalg.inv(a[:, :2])
  return affine(inv, -inv @ a[:, 2])


def translate(dx: float, dy: float) -> np.ndarray:
  return affine(np.eye(2), [dx, dy])


def apply(a: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Landmarks (pixel centres at integers) through an edge-coordinate affine map."""
  p = np.asarray(points, np.float64) + 0.5
  return (p @ a[:, :2].T + a[:, 2] - 0.5).astype(np.float32)


def aligned_frame(points: np.ndarray, size: int, expand: float = EXPAND) -> np.ndarray:
  """The photo -> size x size map that levels the eyes and then crops as prepare does
  (the square of the landmark box's longer side, enlarged by `expand`)."""
  p = np.asarray(points, np.float64)
  dx, dy = p[RIGHT_EYE].mean(0) - p[LEFT_EYE].mean(0)
  level = rotation(-math.atan2(dy, dx))
  turned = apply(affine(level, [0.0, 0.0]), p)
  x0, y0, x1, _ = square_box(landmark_box(turned), "long", expand)
  scale = size / (x1 - x0)
  return compose(affine(scale * np.eye(2), [-scale * x0, -scale * y0]), affine(level, [0, 0]))


def frame_side(a: np.ndarray, size: int) -> float:
  """How many photo pixels the size x size frame of `a` spans."""
  return size / math.sqrt(abs(np.linalg.det(a[:, :2])))


def corners(a: np.ndarray, width: float, height: float) -> np.ndarray:
  """(4, 2) edge coordinates of a width x height image's corners through the map `a`."""
  box = np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64)
  return box @ a[:, :2].T + a[:, 2]


def warp(image: np.ndarray, a: np.ndarray, shape: tuple[int, int], edge: bool = True) -> np.ndarray:
  """(H, W, C) image through the map `a` into an (h, w, C) float32 image (Pillow bicubic).
  Outside the source: its edge pixels repeated (`edge`) or zeros. Only the part of the
  source the output sees is read (and made float), so a face of a large photo costs a face."""
  h, w = shape
  to_src = invert(a)
  if edge:
    src = corners(to_src, w, h)
    height, width = image.shape[:2]
    (x_lo, y_lo), (x_hi, y_hi) = np.floor(src.min(0)) - 3, np.ceil(src.max(0)) + 3
    cx0, cy0 = int(np.clip(x_lo, 0, width - 1)), int(np.clip(y_lo, 0, height - 1))
    cx1, cy1 = int(np.clip(x_hi, cx0 + 1, width)), int(np.clip(y_hi, cy0 + 1, height))
    limit = 4 * max(h, w) + 8
    pads = [int(min(max(v, 0), limit)) for v in (cy0 - y_lo, y_hi - cy1, cx0 - x_lo, x_hi - cx1)]
    image = np.pad(image[cy0:cy1, cx0:cx1], ((pads[0], pads[1]), (pads[2], pads[3]), (0, 0)),
                   mode="edge")
    to_src = compose(translate(pads[2] - cx0, pads[0] - cy0), to_src)
  image = np.asarray(image, np.float32)
  data = tuple(to_src.reshape(-1))
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), "F").transform(
      (w, h), Image.AFFINE, data=data, resample=Image.BICUBIC)) for c in range(image.shape[2])], -1)


def feather_mask(size: int, margin: float = 0.05, ramp: float = 0.15) -> np.ndarray:
  """(size, size) weights: 0 within `margin` of the frame's edge, rising smoothly over
  `ramp` (fractions of the side) to 1 inside, so a pasted face leaves no seam."""
  centres = np.arange(size) + 0.5
  d = np.minimum(centres, size - centres)
  t = np.clip((d - margin * size) / (ramp * size), 0.0, 1.0)
  edge = t * t * (3 - 2 * t)
  return np.minimum(edge[:, None], edge[None, :]).astype(np.float32)


def paste(canvas: np.ndarray, face: np.ndarray, to_face: np.ndarray, mask: np.ndarray) -> Box:
  """Blend `face` (s, s, C) into the float `canvas` (H, W, C), in place, where `to_face`
  (canvas -> face frame) puts it, weighted by `mask` (s, s); returns the region changed."""
  s = face.shape[0]
  from_face = invert(to_face)
  placed = corners(from_face, s, s)
  x0, y0 = np.maximum(np.floor(placed.min(0)), 0).astype(int)
  x1 = int(min(np.ceil(placed[:, 0].max()), canvas.shape[1]))
  y1 = int(min(np.ceil(placed[:, 1].max()), canvas.shape[0]))
  if x1 <= x0 or y1 <= y0:
    return (0.0, 0.0, 0.0, 0.0)
  into_region = compose(translate(-x0, -y0), from_face)
  region = warp(face, into_region, (y1 - y0, x1 - x0), edge=False)
  weight = np.clip(warp(mask[..., None], into_region, (y1 - y0, x1 - x0), edge=False), 0, 1)
  canvas[y0:y1, x0:x1] = weight * region + (1 - weight) * canvas[y0:y1, x0:x1]
  return (float(x0), float(y0), float(x1), float(y1))
