"""Faces of whole photos through an SR model and back: each face aligned to the model's
frame, its LR input made as training made it, and the SR face pasted into the enlarged
photo with a feathered edge. The model stays outside: predict batches faces across photos,
and a test can stand bicubic in for it."""
from __future__ import annotations

import dataclasses
import numpy as np
from PIL import Image

from spadnet_jax.data import contract, degrade
from spadnet_jax.faces import detect, frame
from spadnet_jax.faces.dlib_models import FaceModels

HR_SIZE = contract.HR_SIZE


@dataclasses.dataclass
class Face:
  """One detected face of a photo and what became of it."""
  index: int                            # 1-based, left to right
  detection: detect.Detection
  to_frame: np.ndarray                  # photo -> the model's 128x128 frame
  side: float                           # photo pixels the frame spans
  problem: str | None = None            # why it is left bicubic
  lr: np.ndarray | None = None          # (lr, lr, 3) model LR input, [0, 1]
  lr_up: np.ndarray | None = None       # (128, 128, 3) that upsampled: the network input
  sr: np.ndarray | None = None          # (128, 128, 3) the model's output


def plan(models: FaceModels, image: np.ndarray, *, scale: int, lr_kernel: str = "pil",
         min_face: float, max_face: float, max_upsample: int = 3) -> list[Face]:
  """Detect, check and align every face of an (H, W, 3) uint8 photo; each usable face gets
  its LR input: the aligned face degraded exactly as training degraded HR faces.

  Args:
    models: dlib's detectors and landmark model.
    image: the photo.
    scale: the model's SR factor.
    lr_kernel: the LR synthesis the model was trained with.
    min_face, max_face: the face sizes (photo px) restored; others get a problem.
    max_upsample: doublings of the photo for the small-face pass.
  """
  faces = []
  for i, det in enumerate(detect.find_faces(models, image, max_upsample), 1):
    to_frame = frame.aligned_frame(det.landmarks, HR_SIZE)
    face = Face(i, det, to_frame, frame.frame_side(to_frame, HR_SIZE))
    if not det.confirmed:
      face.problem = f"not confirmed by the CNN detector (HOG score {det.score:.2f})"
    else:
      face.problem = detect.implausible(det.landmarks)
    if face.problem is None and face.side < min_face:
      face.problem = f"too small: {face.side:.0f} px, under --min_face {min_face:g}"
    if face.problem is None and face.side > max_face:
      face.problem = (f"too large: {face.side:.0f} px, over --max_face {max_face:g} "
                      "(its LR input would discard more than the model restores)")
    if face.problem is None:
      aligned = np.clip(frame.warp(image, to_frame, (HR_SIZE, HR_SIZE)) / 255.0, 0, 1)
      face.lr, face.lr_up = degrade.degrade(aligned, scale, lr_kernel)
    faces.append(face)
  return faces


def enlarge(image: np.ndarray, upscale: float) -> np.ndarray:
  """The photo enlarged with Pillow's bicubic, as float [0, 1]: the canvas faces go into."""
  im = Image.fromarray(np.asarray(image, np.uint8))
  size = (int(round(im.width * upscale)), int(round(im.height * upscale)))
  return np.asarray(im.resize(size, Image.BICUBIC), np.float32) / 255.0


def canvas_to_frame(face: Face, upscale: float) -> np.ndarray:
  """The enlarged photo -> the face's frame."""
  return frame.compose(face.to_frame, frame.affine(np.eye(2) / upscale, [0.0, 0.0]))


def paste_faces(canvas: np.ndarray, faces: list[Face], upscale: float,
                mask: np.ndarray | None = None) -> np.ndarray:
  """The canvas with every face that has an SR result pasted in (feathered)."""
  mask = frame.feather_mask(HR_SIZE) if mask is None else mask
  out = np.array(canvas, np.float32, copy=True)
  for face in faces:
    if face.sr is not None:
      frame.paste(out, np.clip(face.sr, 0, 1), canvas_to_frame(face, upscale), mask)
  return np.clip(out, 0, 1)


def restore(image: np.ndarray, faces: list[Face], upscale: float) -> tuple[np.ndarray, np.ndarray]:
  """(bicubic canvas, restored canvas) for one photo whose faces have their SR results."""
  bicubic = enlarge(image, upscale)
  return bicubic, paste_faces(bicubic, faces, upscale)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
  """Two equally sized images with a white gap between them."""
  white = np.ones((left.shape[0], gap, left.shape[2]), np.float32)
  return np.concatenate([left, white, right], axis=1)
