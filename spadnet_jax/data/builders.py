"""tfds builders: embedded synthetic faces and CelebA/Helen in the DIC/SPADNet folder layout.

Both are written as array_record, so they prepare and read without TensorFlow.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from spadnet_jax.data import landmarks as lmk
from spadnet_jax.data import synthetic
from spadnet_jax.faces import frame
from spadnet_jax.untrusted import images, pickles
from spadnet_jax.data.contract import HR_SIZE


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "hr": tfds.features.Image(shape=(HR_SIZE, HR_SIZE, 3), encoding_format="png"),
      "landmarks": tfds.features.Tensor(shape=(lmk.NUM_LANDMARKS, 2), dtype=np.float32),
      "filename": tfds.features.Text(),
  })


class _PreparedOnce:
  """One line when a data set is built (in place of tfds's sizes banner), none when done."""

  def _log_download_bytes(self) -> None:
    print(f"preparing data set {self.name}/{self.builder_config.name} in {self.data_dir} "
          "(once; later runs reuse it)", flush=True)

  def _log_download_done(self) -> None:
    pass


class SyntheticFacesConfig(tfds.core.BuilderConfig):
  """How many faces each split holds."""

  def __init__(self, *, num_train: int, num_test: int, **kwargs: Any):
    super().__init__(**kwargs)
    self.num_train = num_train
    self.num_test = num_test


class SyntheticFaces(_PreparedOnce, tfds.core.GeneratorBasedBuilder):
  """Procedurally drawn 128x128 faces with exact 68-point landmarks (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      SyntheticFacesConfig(name="default", num_train=3000, num_test=300,
                           description="3,000 train and 300 test faces."),
      SyntheticFacesConfig(name="tiny", num_train=48, num_test=20,
                           description="48 train and 20 test faces, for tests."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Synthetic faces drawn from a parametric 68-landmark template.",
        features=_features(), supervised_keys=None)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
    del dl_manager
    return {"train": self._generate_examples(0, self.builder_config.num_train),
            "test": self._generate_examples(10_000_000, self.builder_config.num_test)}

  def _generate_examples(self, first_seed: int,
                         count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    for i in range(count):
      image, points = synthetic.draw_face(first_seed + i)
      name = f"face_{first_seed + i:08d}.png"
      yield name, {"hr": synthetic.png_bytes(image), "landmarks": points, "filename": name}


class BadExample(ValueError):
  """An input file the builder cannot use; the message names the file and the problem."""


def _read_landmarks(entry: Any, path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """Landmarks (68, 2) and an optional bbox from one pickle entry (several known layouts)."""
  bbox = None
  if isinstance(entry, dict):
    if "landmark" not in entry:
      raise BadExample(f"{path}: landmark entry is a dict without a 'landmark' key")
    bbox = entry.get("bbox")
    entry = entry["landmark"]
  try:
    points = np.asarray(entry, np.float32)
  except (TypeError, ValueError) as e:
    raise BadExample(f"{path}: landmarks are not numbers ({e})") from e
  if points.shape == (1, lmk.NUM_LANDMARKS, 2):        # official SPADNet train pickles
    points = points[0]
  if points.shape != (lmk.NUM_LANDMARKS, 2):
    raise BadExample(f"{path}: landmarks have shape {points.shape}, expected (68, 2)")
  bad = np.flatnonzero(~np.isfinite(points).all(1))
  if bad.size:
    k = int(bad[0])
    raise BadExample(f"{path}: landmark {k} is not finite ({points[k, 0]}, {points[k, 1]})")
  if bbox is not None:
    try:
      box = np.asarray(bbox, np.float64)
    except (TypeError, ValueError):
      box = np.zeros(0)
    if box.shape != (4,):
      raise BadExample(f"{path}: bbox {bbox!r:.80} is not 4 numbers [x0, y0, x1, y1]")
    if not np.isfinite(box).all():
      raise BadExample(f"{path}: bbox {list(bbox)} is not finite")
  return points, None if bbox is None else np.asarray(bbox, np.float32)


def load_face(path: str, entry: Any,
              max_pixels: float = images.MAX_PIXELS) -> tuple[np.ndarray, np.ndarray, str]:
  """Read one HR face, its landmarks and the file's colour mode, cropping to the bbox when
  the entry has one.

  With a bbox (DIC's layout: full-image landmarks) the crop is resized to 128x128 with
  Pillow's bicubic and the landmarks follow; without, the image must already be 128x128.
  Grayscale, palette, RGBA and 16-bit files are converted to 8-bit RGB (alpha dropped).
  A file whose header declares more than `max_pixels` is refused before decoding.
  """
  points, bbox = _read_landmarks(entry, path)
  try:
    image, mode, _ = images.load_rgb(path, max_pixels, "config.data.max_image_pixels")
  except ValueError as e:
    raise BadExample(str(e)) from None
  if bbox is not None:
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if x1 <= x0 or y1 <= y0:
      raise BadExample(f"{path}: empty bbox {bbox.tolist()}")
    if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
      raise BadExample(f"{path}: bbox {bbox.tolist()} reaches outside the "
                       f"{image.width}x{image.height} image")
    image = image.resize((HR_SIZE, HR_SIZE), Image.BICUBIC, box=(x0, y0, x1, y1))
    points = frame.box_points(points, (x0, y0, x1, y1), HR_SIZE)
  elif image.size != (HR_SIZE, HR_SIZE):
    raise BadExample(f"{path}: image is {image.size[0]}x{image.size[1]}, expected "
                     f"{HR_SIZE}x{HR_SIZE} (or a landmark entry with a 'bbox' to crop)")
  outside = np.flatnonzero((points < -0.5).any(1) | (points > HR_SIZE - 0.5).any(1))
  if outside.size:
    k = int(outside[0])
    raise BadExample(f"{path}: landmark {k} at ({points[k, 0]:.1f}, {points[k, 1]:.1f}) lies "
                     f"outside the {HR_SIZE}x{HR_SIZE} face")
  return np.asarray(image, np.uint8), points, mode


class FaceFolder(_PreparedOnce, tfds.core.GeneratorBasedBuilder):
  """CelebA or Helen prepared as in DIC / the official SPADNet loader (see README)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="celeba", description="CelebA, DIC split."),
                     tfds.core.BuilderConfig(name="helen", description="Helen, FSRNet split."),
                     tfds.core.BuilderConfig(name="photos",
                                             description="Any photos, by spadnet_jax.prepare.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Place the prepared faces under manual_dir as
    <manual_dir>/train/HR/*.png   128x128 HR faces (or full images with a bbox entry)
    <manual_dir>/train/landmark.pkl   {file name: 68x2 [x, y] | [68x2] |
                                       {'landmark': 68x2, 'bbox': [x0, y0, x1, y1]}}
    <manual_dir>/test/HR/*.png and <manual_dir>/test/landmark.pkl
  """

  def __init__(self, *, skip_bad_examples: bool = False, max_image_pixels: float = images.MAX_PIXELS,
               **kwargs: Any):
    self.skip_bad_examples = skip_bad_examples
    self.max_image_pixels = max_image_pixels
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Face SR data in the DIC/SPADNet folder layout.", features=_features())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
    root = os.fspath(dl_manager.manual_dir)
    splits = {}
    for split in ("train", "test"):
      hr_dir = os.path.join(root, split, "HR")
      pkl = os.path.join(root, split, "landmark.pkl")
      if not os.path.isdir(hr_dir):
        raise FileNotFoundError(f"split folder {hr_dir} is missing (see the layout in README)")
      if not os.path.isfile(pkl):
        raise FileNotFoundError(f"landmark file {pkl} is missing")
      splits[split] = self._generate_examples(hr_dir, pkl)
    return splits

  def _generate_examples(self, hr_dir: str, pkl: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
      table = pickles.load(pkl)
    except (ValueError, OSError) as e:
      raise BadExample(str(e)) from None
    if not isinstance(table, dict):
      raise BadExample(f"{pkl}: holds a {type(table).__name__}, not a dict of file name -> "
                       "landmarks")
    skipped, converted = [], collections.Counter()
    for name in sorted(n for n in os.listdir(hr_dir) if n.lower().endswith((".png", ".jpg"))):
      path = os.path.join(hr_dir, name)
      try:
        if name not in table:
          raise BadExample(f"{path}: no entry for {name!r} in {pkl}")
        image, points, mode = load_face(path, table[name], self.max_image_pixels)
      except BadExample as e:
        if not self.skip_bad_examples:
          raise
        skipped.append(str(e))
        continue
      if mode != "RGB":
        converted[mode] += 1
      yield name, {"hr": synthetic.png_bytes(image), "landmarks": points, "filename": name}
    if skipped:
      logging.warning("skipped %d bad examples in %s: %s", len(skipped), hr_dir, skipped[:10])
      print(f"skipped {len(skipped)} bad examples in {hr_dir}", flush=True)
    if converted:
      modes = ", ".join(f"{n} {m}" for m, n in sorted(converted.items()))
      print(f"converted to RGB in {hr_dir}: {modes} images", flush=True)
