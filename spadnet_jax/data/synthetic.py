"""Procedurally drawn faces with exact 68-point landmarks: the no-download data set.

Each face is a parametric template (jaw, brows, nose, eyes, lips in the iBUG 68-point
order) under random shape, pose (rotation, scale, shift) and colour; it is drawn with
Pillow at 2x and reduced, so edges are antialiased. Everything follows from the seed.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 128], [198, 134, 96],
                 [160, 100, 70], [110, 70, 50]], np.float32)
HAIR = np.array([[20, 16, 14], [60, 40, 25], [110, 75, 40], [170, 130, 80], [200, 190, 170],
                 [90, 30, 20]], np.float32)


def _template(rng: np.random.Generator) -> np.ndarray:
  """(68, 2) landmarks of an upright face centred at the origin, unit ~ half face width."""
  jitter = lambda s: rng.uniform(1 - s, 1 + s)
  fw, fh = 1.0 * jitter(0.08), 1.25 * jitter(0.08)     # half width, half height of the jaw
  pts = np.zeros((68, 2), np.float32)
  t = np.linspace(np.pi * 0.02, np.pi * 0.98, 17)      # jaw 0..16, from the image's left ear
  chin = jitter(0.1)
  pts[0:17] = np.stack([-fw * np.cos(t), 0.05 + fh * 0.8 * np.sin(t) ** chin], 1)
  brow_y, eye_y, eye_dx = -0.42 * jitter(0.1), -0.22 * jitter(0.1), 0.42 * jitter(0.08)
  for side, start in ((-1, 17), (1, 22)):               # brows 17-21 (left), 22-26 (right)
    xs = np.linspace(0.15, 0.75, 5) * jitter(0.05)
    xs = xs if side == 1 else -xs[::-1]
    pts[start:start + 5] = np.stack([xs, brow_y - 0.08 * np.sin(np.linspace(0, np.pi, 5))], 1)
  pts[27:31] = np.stack([np.zeros(4), np.linspace(-0.2, 0.12, 4)], 1)   # nose bridge
  nw = 0.16 * jitter(0.15)
  pts[31:36] = np.stack([np.linspace(-nw, nw, 5), 0.2 + 0.03 * np.cos(np.linspace(-1.2, 1.2, 5))], 1)
  ew, eh = 0.16 * jitter(0.12), 0.07 * jitter(0.25)
  a = np.arange(6) * np.pi / 3        # 36/42 outer corner, upper lid, inner corner, lower lid
  for cx, start in ((-eye_dx, 36), (eye_dx, 42)):
    pts[start:start + 6] = np.stack([cx - ew * np.cos(a), eye_y - eh * np.sin(a)], 1)
  mw, mouth_y = 0.36 * jitter(0.12), 0.5 * jitter(0.05)
  openness = rng.uniform(0.0, 0.08)
  ao = np.linspace(0, 2 * np.pi, 13)[:12]                  # outer lip 48-59
  pts[48:60] = np.stack([-mw * np.cos(ao), mouth_y - 0.07 * np.sin(ao) * np.where(np.sin(ao) > 0, 1.0, 1.6)], 1)
  ai = np.linspace(0, 2 * np.pi, 9)[:8]                    # inner lip 60-67
  pts[60:68] = np.stack([-0.7 * mw * np.cos(ai), mouth_y - openness * np.sin(ai)], 1)
  return pts


def _pose(pts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random similarity transform to 128x128 pixels (rotation, scale, shift jitter)."""
  angle = np.deg2rad(rng.normal(0, 8))
  scale = SIZE * 0.3 * rng.uniform(0.9, 1.1)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
  shift = np.array([SIZE / 2, SIZE / 2 - 4], np.float32) + rng.normal(0, 3, 2)
  return (pts @ rot.T) * scale + shift


def draw_face(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(128, 128, 3) uint8 image and (68, 2) float32 landmarks (x, y) of face `seed`."""
  rng = np.random.default_rng(seed)
  lm = _pose(_template(rng), rng).astype(np.float32)
  up = 2
  img = Image.new("RGB", (SIZE * up, SIZE * up))
  d = ImageDraw.Draw(img)
  top, bottom = rng.uniform(20, 120, 3), rng.uniform(20, 200, 3)   # background gradient
  grad = np.linspace(0, 1, SIZE * up)[:, None, None]
  bg = (top * (1 - grad) + bottom * grad) * np.ones((1, SIZE * up, 1))
  img.paste(Image.fromarray(bg.astype(np.uint8)))
  skin = SKIN[rng.integers(len(SKIN))] * rng.uniform(0.9, 1.05)
  hair = HAIR[rng.integers(len(HAIR))]
  col = lambda c: tuple(int(v) for v in np.clip(c, 0, 255))
  s = lambda p: [tuple(float(v) * up for v in q) for q in p]
  jaw = lm[0:17]
  cx, cy = jaw[:, 0].mean(), lm[27, 1]
  rx = (jaw[:, 0].max() - jaw[:, 0].min()) / 2
  hair_h = rx * rng.uniform(1.1, 1.5)
  d.ellipse([(cx - rx * 1.12) * up, (cy - hair_h - 10) * up, (cx + rx * 1.12) * up, (cy + rx * 0.6) * up],
            fill=col(hair))
  forehead = [(cx + rx * np.cos(t), cy - rx * 1.05 * np.sin(t)) for t in np.linspace(0, np.pi, 16)]
  d.polygon(s(np.concatenate([jaw, np.array(forehead, np.float32)])), fill=col(skin))
  brow = col(hair * 0.8)
  d.line(s(lm[17:22]), fill=brow, width=3 * up)
  d.line(s(lm[22:27]), fill=brow, width=3 * up)
  iris = col(rng.uniform(20, 140, 3))
  for start in (36, 42):
    eye = lm[start:start + 6]
    d.polygon(s(eye), fill=(245, 245, 240))
    c = eye.mean(0)
    r = (eye[:, 1].max() - eye[:, 1].min()) * 0.45
    d.ellipse([(c[0] - r) * up, (c[1] - r) * up, (c[0] + r) * up, (c[1] + r) * up], fill=iris)
    d.line(s(np.concatenate([eye, eye[:1]])), fill=col(skin * 0.5), width=up)
  d.line(s(lm[27:31]), fill=col(skin * 0.8), width=2 * up)
  d.line(s(lm[31:36]), fill=col(skin * 0.6), width=2 * up)
  lip = col(skin * np.array([0.95, 0.55, 0.55]))
  d.polygon(s(lm[48:60]), fill=lip)
  d.polygon(s(lm[60:68]), fill=col(skin * 0.3))
  img = img.filter(ImageFilter.GaussianBlur(radius=0.6 * up)).resize((SIZE, SIZE), Image.BICUBIC)
  return np.asarray(img), lm


def png_bytes(image: np.ndarray) -> bytes:
  """Encode an (H, W, 3) uint8 array as PNG."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()
