"""The input pipeline: tfds data sources read by grain, sharded by process, resumable.

Every example leaves as {'hr', 'lr', 'lr_up', 'heatmap', 'filename'} (float32 in [0, 1],
NHWC): LR synthesis, heatmaps and augmentation run on the host in NumPy.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from spadnet_jax.data import builders  # noqa: F401  (registers the tfds builders)
from spadnet_jax.data import degrade, landmarks as lmk, provenance

# tfds celeb_a: 178x218 aligned faces; the centred 178x178 square is resized to 128x128.
CELEBA_CROP = (0, 20, 178, 198)
CELEBA_POINTS = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
CELEBA_GROUPS = ((0,), (1,), (2,), (3, 4), ())


def _celeba_example(ex: dict[str, Any]) -> dict[str, Any]:
  """tfds celeb_a record -> canonical raw example with 5 landmarks."""
  x0, y0, x1, y1 = CELEBA_CROP
  image = Image.fromarray(ex["image"]).resize((128, 128), Image.BICUBIC, box=CELEBA_CROP)
  pts = np.array([[ex["landmarks"][f"{p}_x"], ex["landmarks"][f"{p}_y"]] for p in CELEBA_POINTS],
                 np.float32)
  pts = (pts - np.array([x0, y0], np.float32) + 0.5) * (128.0 / (x1 - x0)) - 0.5
  return {"hr": np.asarray(image), "landmarks": pts, "filename": str(ex.get("filename", ""))}


def load_builder(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder named by cfg.name, preparing it first where it can.

  Preparation holds a file lock beside the data set, so the processes of a run (or two
  runs) sharing a data_dir build it once while the others wait; where each host has its
  own data_dir, each builds its own copy. A prepared copy records its source
  (provenance.json) and is refused when this run's source or settings differ.
  """
  kwargs: dict[str, Any] = dict(data_dir=cfg.get("data_dir") or None)
  if cfg.name.startswith("face_folder"):
    kwargs["skip_bad_examples"] = bool(cfg.get("skip_bad_examples", False))
  if cfg.name != "celeb_a":
    kwargs["file_format"] = "array_record"
  try:
    builder = tfds.builder(cfg.name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.name={cfg.name!r} is not a known data set ({e})") from e
  if cfg.name == "celeb_a":
    return builder            # never prepared here: it needs a manual download
  manual_dir = cfg.get("manual_dir") or None
  with provenance.build_lock(builder):
    if builder.is_prepared():
      builder = tfds.builder(cfg.name, **kwargs)    # another process may have just built it
      provenance.check(builder, cfg)
      return builder
    if cfg.name.startswith("face_folder") and not manual_dir:
      raise ValueError(f"config.data.manual_dir must point at the prepared {cfg.name} folders "
                       "(see 'Data' in README) the first time the data set is built")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    provenance.record(builder, cfg)
  return builder


def get_source(cfg: ml_collections.ConfigDict, split: str) -> tuple[grain.MapDataset, tuple]:
  """Random-access canonical raw examples of `split` and their heatmap groups."""
  builder = load_builder(cfg)
  if builder.info.splits and split not in builder.info.splits:
    raise ValueError(f"data set {cfg.name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  try:
    source = builder.as_data_source(split)
  except Exception as e:
    raise FileNotFoundError(
        f"config.data.name={cfg.name!r}: no prepared array_record copy in {builder.data_dir} "
        f"({e}); for celeb_a run `tfds build celeb_a --file_format=array_record`") from e
  ds = grain.MapDataset.source(source)
  if cfg.name == "celeb_a":
    return ds.map(_celeba_example), CELEBA_GROUPS
  return ds, lmk.GROUPS


class MakeExample(grain.transforms.RandomMap):
  """Raw (hr uint8, landmarks) -> training example, with optional flip / rot90."""

  def __init__(self, scale: int, lr_kernel: str, groups: tuple, flip: bool, rot90: bool,
               sigma: float = 1.0):
    self.scale, self.lr_kernel, self.groups = scale, lr_kernel, groups
    self.flip, self.rot90, self.sigma = flip, rot90, sigma

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image, points = element["hr"], element["landmarks"]
    mirror = lmk.MIRROR if len(points) == lmk.NUM_LANDMARKS else np.array([1, 0, 2, 4, 3])
    if self.flip and rng.random() < 0.5:
      image, points = lmk.hflip(image, points, mirror)
    if self.rot90:
      image, points = lmk.rot90(image, points, int(rng.integers(4)))
    return make_example(image, points, element["filename"], self.scale, self.lr_kernel,
                        self.groups, self.sigma)


def make_example(image: np.ndarray, points: np.ndarray, filename: Any, scale: int,
                 lr_kernel: str = "pil", groups: tuple = lmk.GROUPS,
                 sigma: float = 1.0) -> dict[str, Any]:
  """One canonical example from an HR uint8 image and its landmarks."""
  hr = np.ascontiguousarray(image, np.float32) / 255.0
  lr, lr_up = degrade.degrade(hr, scale, lr_kernel)
  if isinstance(filename, bytes):
    filename = filename.decode()
  return {"hr": hr, "lr": lr, "lr_up": lr_up,
          "heatmap": lmk.heatmaps(points, hr.shape[0], sigma, groups),
          "filename": np.asarray(str(filename))}


def _shard(ds: grain.MapDataset) -> grain.MapDataset:
  """This process's share of the examples (grain slicing by jax.process_index)."""
  return ds[jax.process_index()::jax.process_count()]


def local_batch_size(global_batch: int) -> int:
  """Examples per process of a global batch; the batch must split evenly."""
  if global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} is not divisible by the {jax.process_count()} "
                     "processes")
  return global_batch // jax.process_count()


def train_dataset(cfg: ml_collections.ConfigDict, scale: int, global_batch: int, seed: int,
                  start: int = 0) -> grain.IterDataset:
  """Endless, reshuffled-every-epoch training batches: this process's rows of each global batch.

  One global sequence of examples (shuffle, repeat and augmentation keyed by the global
  index) is cut into global batches; process p reads rows [p*L, (p+1)*L) of each. `start`
  is the number of examples already consumed, so a run resumes from the same global
  position whatever its process count, device count or batch size.
  """
  ds, groups = get_source(cfg, cfg.get("train_split", "train"))
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(MakeExample(scale, cfg.lr_kernel, groups, cfg.augment_flip,
                                 cfg.augment_rot90), seed=seed + 1)
  ds = ds[start:].batch(local_batch_size(global_batch), drop_remainder=True)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.get("num_threads", 2),
                                              prefetch_buffer_size=cfg.get("prefetch", 4)))


def eval_dataset(cfg: ml_collections.ConfigDict, scale: int, split: str,
                 local_batch: int) -> tuple[grain.MapDataset, int]:
  """This process's examples of `split` in order, batched (the last batch may be short)."""
  ds, groups = get_source(cfg, split)
  ds = _shard(ds)
  count = len(ds)
  ds = ds.map(lambda e: make_example(e["hr"], e["landmarks"], e["filename"], scale,
                                     cfg.lr_kernel, groups))
  return ds.batch(local_batch, drop_remainder=False), count

