"""Real-photo throughput: faces prepared per minute, and faces found and aligned per minute
for predict --faces, on this machine.

    python -m benchmarks.faces [--photos 60] [--workers 1 2]

The photos are the real portraits that packages ship (scikit-image's astronaut, matplotlib's
Grace Hopper), mirrored, scaled and cropped to CelebA's in-the-wild sizes (about 400-600 px
a side, one face each). Needs the faces extra, scikit-image and matplotlib.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from spadnet_jax import prepare
from spadnet_jax.faces import dlib_models, restore


def make_photos(folder: str, count: int) -> list[str]:
  """`count` one-face photos of 400-600 px from the two shipped portraits."""
  from tests import real_photos  # pylint: disable=import-outside-toplevel
  sources = [real_photos.astronaut(), real_photos.hopper()]
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(count):
    image = sources[i % 2]
    if i // 2 % 2:
      image = image[:, ::-1]
    h, w = image.shape[:2]
    cut = rng.integers(0, 40, size=4)
    image = image[cut[0]:h - cut[1], cut[2]:w - cut[3]]
    width = int(rng.integers(400, 600))
    photo = Image.fromarray(np.ascontiguousarray(image)).resize(
        (width, round(image.shape[0] * width / image.shape[1])), Image.BICUBIC)
    paths.append(os.path.join(folder, f"{i:06d}.jpg"))
    photo.save(paths[-1], quality=92)
  return paths


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--photos", type=int, default=60)
  p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  args = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    paths = make_photos(os.path.join(tmp, "photos"), args.photos)
    for workers in args.workers:
      start = time.perf_counter()
      counts = prepare.prepare(os.path.join(tmp, "photos"), os.path.join(tmp, f"out{workers}"),
                               workers=workers)
      seconds = time.perf_counter() - start
      rows.append((f"prepare (HOG, --max_upsample 1), {workers} worker(s)", len(paths),
                   sum(counts.values()), seconds))
    models = dlib_models.load("hog")
    start = time.perf_counter()
    found, some = 0, paths[:max(4, len(paths) // 4)]
    for path in some:
      photo = np.asarray(Image.open(path).convert("RGB"))
      faces = restore.plan(models, photo, scale=8, min_face=1, max_face=1e9)
      found += sum(f.lr is not None for f in faces)
    rows.append(("predict --faces: find, confirm, align (HOG, --max_upsample 3), 1 process",
                 len(some), found, time.perf_counter() - start))
  print(f"\n{os.cpu_count()} CPU cores\n\n| step | photos | faces | seconds | photos/min | faces/min |"
        "\n|---|---|---|---|---|---|")
  for what, photos, faces, seconds in rows:
    print(f"| {what} | {photos} | {faces} | {seconds:.1f} | {photos / seconds * 60:.0f} | "
          f"{faces / seconds * 60:.0f} |")


if __name__ == "__main__":
  main()
