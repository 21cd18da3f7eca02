"""Every face in a photo: detection at the photo's size and on an upsampled pyramid (small
faces, the ones x8 SR is for), merged, each with its 68 landmarks."""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from spadnet_jax.faces import frame
from spadnet_jax.faces.dlib_models import FaceModels

# HOG finds faces of about 80 px and up; each upsampling halves that. The pyramid is capped
# in pixels so that a large photo stays affordable (the CNN detector is far slower).
MAX_PIXELS = {"hog": 24e6, "cnn": 4e6}
# HOG boxes scoring below this are confirmed by the CNN detector on the enlarged region
# (on astronaut.png a mission patch scores 0.06-0.12 and a real 20 px face 0.11).
CONFIRM_BELOW = 0.5
CONFIRM_SIZE = 100   # px: the box's size in the region the CNN detector looks at


@dataclasses.dataclass(frozen=True)
class Detection:
  box: frame.Box            # the detector's box, pixel edges
  score: float              # the detector's confidence
  landmarks: np.ndarray     # (68, 2) [x, y], pixel centres at integers
  confirmed: bool           # strong, or confirmed by the CNN detector


def upsample_levels(height: int, width: int, max_level: int, max_pixels: float) -> int:
  """How many times to double the photo for the small-face pass, within `max_pixels`."""
  level = 0
  while level < max_level and height * width * 4 ** (level + 1) <= max_pixels:
    level += 1
  return level


def iou(a: frame.Box, b: frame.Box) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def merge(boxes: list[tuple[frame.Box, float]], overlap: float = 0.3) -> list[tuple[frame.Box, float]]:
  """Non-maximum suppression: the best-scoring box of each overlapping group."""
  kept: list[tuple[frame.Box, float]] = []
  for box, score in sorted(boxes, key=lambda bs: -bs[1]):
    if all(iou(box, k) <= overlap for k, _ in kept):
      kept.append((box, score))
  return kept


def find_faces(models: FaceModels, image: np.ndarray, max_upsample: int = 3,
               min_score: float = 0.0) -> list[Detection]:
  """Faces in an (H, W, 3) uint8 photo, left to right then top to bottom."""
  h, w = image.shape[:2]
  level = upsample_levels(h, w, max_upsample, MAX_PIXELS[models.detector_name])
  found = models.detect(image, 0)
  if level:
    found += models.detect(image, level)
  found = [(b, s) for b, s in merge(found) if s >= min_score]
  found.sort(key=lambda bs: (bs[0][0], bs[0][1]))
  return [Detection(b, s, models.landmarks(image, b),
                    models.detector_name == "cnn" or s >= CONFIRM_BELOW or confirm(models, image, b))
          for b, s in found]


def confirm(models: FaceModels, image: np.ndarray, box: frame.Box) -> bool:
  """Whether the CNN detector finds a face on `box`, looking at the box with half its size
  around it, resized so that the box is CONFIRM_SIZE px."""
  x0, y0, x1, y1 = box
  side = max(x1 - x0, y1 - y0)
  k = CONFIRM_SIZE / side
  rx0, ry0 = int(max(0, x0 - side / 2)), int(max(0, y0 - side / 2))
  rx1, ry1 = int(min(image.shape[1], x1 + side / 2)), int(min(image.shape[0], y1 + side / 2))
  region = Image.fromarray(np.ascontiguousarray(image[ry0:ry1, rx0:rx1], np.uint8))
  region = region.resize((max(1, round(region.width * k)), max(1, round(region.height * k))),
                         Image.BICUBIC)
  scaled = ((x0 - rx0) * k, (y0 - ry0) * k, (x1 - rx0) * k, (y1 - ry0) * k)
  return any(iou(scaled, b) > 0.3 for b, _ in models.detect(np.asarray(region), 0, "cnn"))


def implausible(points: np.ndarray) -> str | None:
  """Why the landmarks cannot be a face seen from the front (None when they can): in the
  frame that levels the eyes, the eyes must lie above the nose tip and that above the mouth,
  with the nose tip between the eyes (a profile puts it outside)."""
  p = frame.apply(frame.aligned_frame(points, 128), points)
  left, right = p[frame.LEFT_EYE].mean(0), p[frame.RIGHT_EYE].mean(0)
  nose, mouth = p[30], p[48:68].mean(0)
  eyes_y = (left[1] + right[1]) / 2
  if not eyes_y < nose[1] < mouth[1]:
    return "landmarks are not eyes above nose above mouth"
  if not left[0] < nose[0] < right[0]:
    return "landmarks put the nose outside the eyes"
  return None
