"""Which photo collection a folder holds (CelebA, Helen or any other) and the splits each
gets: the literature's for CelebA and Helen, seeded fractions for the rest.

Every split here is a function of the file names and (for CelebA) the official partition
file alone, so it does not depend on the order or the number of workers that prepared them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

from PIL import Image

from spadnet_jax.untrusted import images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")   # also predict's
# DIC's counts (CelebA) and FSRNet's (Helen), after their landmark checks.
CELEBA_SPLITS = {"train": 168_854, "val": 100, "test": 1_000}
HELEN_SPLITS = {"train": 2_005, "test": 50}
_HELEN_NAME = re.compile(r"^\d+_\d+\.jpg$", re.IGNORECASE)


@dataclasses.dataclass
class PhotoSet:
  kind: str                                   # 'celeba', 'helen' or 'folder'
  root: str                                   # folder the image names are relative to
  images: list[str]                           # relative paths, sorted
  boxes: dict[str, tuple[float, float, float, float]] = dataclasses.field(default_factory=dict)
  partition: dict[str, int] = dataclasses.field(default_factory=dict)   # CelebA: 0/1/2

  def describe(self) -> str:
    what = {"celeba": "CelebA (in-the-wild images, list_bbox_celeba.txt boxes)",
            "helen": "Helen", "folder": "a folder of photos"}[self.kind]
    return f"{what}: {len(self.images):,} images under {self.root}"


def load_photo(path: str, max_pixels: float = images.MAX_PIXELS,
               limit: str = "--max_pixels") -> Image.Image:
  """An 8-bit RGB photo, upright by its EXIF orientation; ValueError naming the file when it
  is unreadable or its header declares more than `max_pixels` (`limit` names the setting)."""
  return images.load_rgb(path, max_pixels, limit, upright=True).image


def _find(names: tuple[str, ...], folders: list[str]) -> str | None:
  for folder in folders:
    for name in names:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return None


def _images(root: str, exclude: str | None = None) -> list[str]:
  found = []
  skip = os.path.abspath(exclude) if exclude else None
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and os.path.abspath(os.path.join(folder, d)) != skip)
    found += [os.path.relpath(os.path.join(folder, f), root) for f in files
              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  return sorted(found)


def _celeba_table(path: str, columns: int) -> dict[str, list[str]]:
  """CelebA's annotation files: a count line, maybe a header line, then `name values...`."""
  table = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      parts = line.split()
      if len(parts) != columns + 1 or not parts[0].lower().endswith(IMAGE_EXTENSIONS):
        if number <= 2:
          continue
        raise ValueError(f"{path}:{number}: expected a file name and {columns} numbers, "
                         f"got {line.strip()!r}")
      table[parts[0]] = parts[1:]
  return table


def recognise(input_dir: str, exclude: str | None = None) -> PhotoSet:
  """CelebA when list_bbox_celeba.txt sits in the folder, its Anno/ or its parent (images in
  img_celeba/ or the folder itself); Helen when its images are named like Helen's
  (<digits>_<digits>.jpg); otherwise a plain folder of photos (searched recursively,
  leaving out the folder `exclude`: prepare's output may sit inside its input)."""
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"--input {input_dir} is not a folder")
  parent = os.path.dirname(os.path.abspath(input_dir))
  places = [input_dir, os.path.join(input_dir, "Anno"), os.path.join(input_dir, "Eval"),
            parent, os.path.join(parent, "Anno"), os.path.join(parent, "Eval")]
  bbox_file = _find(("list_bbox_celeba.txt",), places)
  if bbox_file:
    root = next((p for p in (os.path.join(input_dir, "img_celeba"), input_dir)
                 if os.path.isdir(p) and any(f.lower().endswith(IMAGE_EXTENSIONS)
                                             for f in os.listdir(p))), input_dir)
    boxes = {}
    for name, (x, y, w, h) in _celeba_table(bbox_file, 4).items():
      x, y, w, h = (float(v) for v in (x, y, w, h))
      boxes[name] = (x, y, x + w, y + h)
    partition_file = _find(("list_eval_partition.txt",), places)
    partition = ({n: int(v[0]) for n, v in _celeba_table(partition_file, 1).items()}
                 if partition_file else {})
    images = sorted(n for n in os.listdir(root) if n in boxes)
    return PhotoSet("celeba", root, images, boxes, partition)
  images = _images(input_dir, exclude)
  if not images:
    raise FileNotFoundError(f"--input {input_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  helen = sum(bool(_HELEN_NAME.match(os.path.basename(n))) for n in images)
  kind = "helen" if helen >= 0.9 * len(images) else "folder"
  return PhotoSet(kind, input_dir, images)


def parse_fractions(text: str) -> dict[str, float]:
  """'train=0.9,test=0.1' -> {'train': 0.9, 'test': 0.1}; ValueError naming --split."""
  out = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"--split {text!r}: expected name=fraction pairs such as "
                       "train=0.9,test=0.1") from None
  if not {"train", "test"} <= set(out) or any(v < 0 for v in out.values()) \
     or abs(sum(out.values()) - 1) > 1e-6:
    raise ValueError(f"--split {text!r}: needs train and test, fractions >= 0 summing to 1")
  return out


def _rank(seed: int, name: str) -> str:
  return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def assign(photo_set: PhotoSet, prepared: list[str], fractions: dict[str, float],
           seed: int) -> dict[str, str]:
  """Split name per prepared image ('unused' beyond the literature's counts).

  CelebA: test = the first 1,000 prepared images of the official test partition (by name),
  val = the first 100 of the validation partition, train = the first 168,854 of the rest of
  the train and validation partitions; without list_eval_partition.txt, the last 1,100 by
  name give test then val. Helen: test = the last 50 by file name, train = the first 2,005 of the
  rest. A folder: images ordered by a seeded hash of their names, cut by the fractions
  (each split at least one image where there are enough).
  """
  prepared = sorted(prepared, key=os.path.basename if photo_set.kind == "helen" else None)
  out = {}
  if photo_set.kind == "celeba":
    if photo_set.partition:
      part = photo_set.partition
      test = [n for n in prepared if part.get(n) == 2][:CELEBA_SPLITS["test"]]
      val = [n for n in prepared if part.get(n) == 1][:CELEBA_SPLITS["val"]]
    else:
      tail = prepared[-(CELEBA_SPLITS["test"] + CELEBA_SPLITS["val"]):]
      test, val = tail[-CELEBA_SPLITS["test"]:], tail[:-CELEBA_SPLITS["test"]]
    chosen = set(test) | set(val)
    rest = [n for n in prepared if n not in chosen and photo_set.partition.get(n, 0) != 2]
    out.update({n: "test" for n in test})
    out.update({n: "val" for n in val})
    out.update({n: "train" for n in rest[:CELEBA_SPLITS["train"]]})
  elif photo_set.kind == "helen":
    test = prepared[-HELEN_SPLITS["test"]:]
    out.update({n: "train" for n in prepared[:-HELEN_SPLITS["test"]][:HELEN_SPLITS["train"]]})
    out.update({n: "test" for n in test})
  else:
    order = sorted(prepared, key=lambda n: _rank(seed, n))
    names = sorted(fractions, key=lambda s: (s == "train", s != "test", s))  # train takes the rest
    counts = {s: int(round(fractions[s] * len(order))) for s in names}
    if len(order) >= sum(1 for s in names if fractions[s] > 0):
      for s in names:
        counts[s] = max(counts[s], 1 if fractions[s] > 0 else 0)
    start = 0
    for s in names[:-1]:
      out.update({n: s for n in order[start:start + counts[s]]})
      start += counts[s]
    out.update({n: names[-1] for n in order[start:]})
  return {n: out.get(n, "unused") for n in prepared}
