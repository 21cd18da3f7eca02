"""Draw docs/synthetic_faces.png: synthetic faces with landmarks, LR input and heatmaps.

    python docs/make_samples.py
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image, ImageDraw

from spadnet_jax import visualize  # pylint: disable=wrong-import-position
from spadnet_jax.data import pipeline, synthetic  # pylint: disable=wrong-import-position



def panel(seed: int) -> np.ndarray:
  """HR with landmarks | LR x8 upsampled | heatmap groups in colour, each 128x128."""
  image, pts = synthetic.draw_face(seed)
  ex = pipeline.make_example(image, pts, "", 8)
  marked = Image.fromarray(image)
  d = ImageDraw.Draw(marked)
  for x, y in pts:
    d.point((float(x), float(y)), fill=(0, 255, 0))
  heat = np.clip(ex["heatmap"] @ visualize.GROUP_COLOURS * 255, 0, 255)
  return np.concatenate([np.asarray(marked), (ex["lr_up"] * 255).astype(np.uint8),
                         heat.astype(np.uint8)], axis=1)


def main() -> None:
  rows = [np.concatenate([panel(r * 2 + c) for c in range(2)], axis=1) for r in range(4)]
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_faces.png")
  Image.fromarray(np.concatenate(rows, axis=0)).resize((768 * 2, 512 * 2), Image.NEAREST).save(out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
