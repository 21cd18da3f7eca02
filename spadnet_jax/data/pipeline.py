"""The input pipeline: a registered data source read by grain, sharded by process, resumable.

Every example leaves as the data contract's {'hr', 'lr', 'lr_up', 'heatmap', 'filename'}
(float32 in [0, 1], NHWC): LR synthesis, heatmaps and augmentation run on the host in NumPy.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from spadnet_jax.data import degrade, landmarks as lmk, sources


class Data:
  """A data set opened once for a run: config.data, its source and the source's splits."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    self.source = sources.get_source(cfg.name)
    self.splits = self.source.load(cfg)
    self.location: str | None = getattr(self.splits, "location", None)   # where it is stored

  def raw(self, split: str) -> grain.MapDataset:
    """Random-access canonical raw examples of `split`."""
    return grain.MapDataset.source(self.splits[split])

  def num_examples(self, split: str) -> int:
    return len(self.splits[split])


class MakeExample(grain.transforms.RandomMap):
  """Raw (hr uint8, landmarks) -> training example, with optional flip / rot90."""

  def __init__(self, scale: int, lr_kernel: str, source: sources.DataSource, flip: bool,
               rot90: bool, sigma: float = 1.0):
    self.scale, self.lr_kernel, self.source = scale, lr_kernel, source
    self.flip, self.rot90, self.sigma = flip, rot90, sigma

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image, points = element["hr"], element["landmarks"]
    if self.flip and rng.random() < 0.5:
      image, points = lmk.hflip(image, points, self.source.mirror)
    if self.rot90:
      image, points = lmk.rot90(image, points, int(rng.integers(4)))
    return make_example(image, points, element["filename"], self.scale, self.lr_kernel,
                        self.source.groups, self.sigma)


def make_example(image: np.ndarray, points: np.ndarray, filename: Any, scale: int,
                 lr_kernel: str = "pil", groups: tuple = lmk.GROUPS,
                 sigma: float = 1.0) -> dict[str, Any]:
  """One canonical example from an HR uint8 image and its landmarks.

  Args:
    image: (H, W, 3) uint8 HR face.
    points: (68, 2) landmarks in its pixels.
    filename: its name (str or bytes), carried along.
    scale: the SR factor; the LR is H/scale.
    lr_kernel: the LR synthesis (degrade.KERNELS).
    groups: landmark groups per heatmap channel (the source's).
    sigma: the heatmaps' Gaussian width.
  """
  hr = np.ascontiguousarray(image, np.float32) / 255.0
  lr, lr_up = degrade.degrade(hr, scale, lr_kernel)
  if isinstance(filename, bytes):
    filename = filename.decode()
  return {"hr": hr, "lr": lr, "lr_up": lr_up,
          "heatmap": lmk.heatmaps(points, hr.shape[0], sigma, groups),
          "filename": np.asarray(str(filename))}


def local_batch_size(global_batch: int) -> int:
  """Examples per process of a global batch; the batch must split evenly."""
  if global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} is not divisible by the {jax.process_count()} "
                     "processes")
  return global_batch // jax.process_count()


def train_dataset(data: Data, scale: int, global_batch: int, seed: int,
                  start: int = 0) -> grain.IterDataset:
  """Endless, reshuffled-every-epoch training batches: this process's rows of each global batch.

  One global sequence of examples (shuffle, repeat and augmentation keyed by the global
  index) is cut into global batches; process p reads rows [p*L, (p+1)*L) of each. `start`
  is the number of examples already consumed, so a run resumes from the same global
  position whatever its process count, device count or batch size.

  Args:
    data: the opened data set (its config: train_split, lr_kernel, augmentation, threads).
    scale: the SR factor.
    global_batch: examples per step over all processes.
    seed: keys the shuffle and the augmentation.
    start: examples of the sequence already consumed.
  """
  cfg = data.cfg
  ds = data.raw(cfg.train_split).shuffle(seed=seed).repeat(None)
  ds = ds.random_map(MakeExample(scale, cfg.lr_kernel, data.source, cfg.augment_flip,
                                 cfg.augment_rot90), seed=seed + 1)
  ds = ds[start:].batch(local_batch_size(global_batch), drop_remainder=True)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch))


def eval_dataset(data: Data, scale: int, split: str,
                 local_batch: int) -> tuple[grain.MapDataset, int]:
  """This process's examples of `split` in order, batched (the last batch may be short)."""
  ds = data.raw(split)[jax.process_index()::jax.process_count()]
  count = len(ds)
  groups, kernel = data.source.groups, data.cfg.lr_kernel
  ds = ds.map(lambda e: make_example(e["hr"], e["landmarks"], e["filename"], scale, kernel, groups))
  return ds.batch(local_batch, drop_remainder=False), count
