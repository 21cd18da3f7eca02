"""Data sources, registered by name: config.data.name picks one.

A source opens a data set once per run and gives its splits as random-access sequences
of canonical raw examples {'hr': (128, 128, 3) uint8, 'landmarks': (K, 2) float32 [x, y]
in HR pixels, 'filename': str}, and says how its landmarks become heatmaps (groups) and
follow a horizontal flip (mirror permutation). The pipeline does the rest (LR synthesis,
heatmaps, augmentation, batching, sharding across processes).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from spadnet_jax.data import builders  # noqa: F401  (registers the tfds builders)
from spadnet_jax.data import contract, landmarks as lmk, provenance, remote
from spadnet_jax.registry import Registry
from spadnet_jax.storage import paths

Splits = Mapping[str, Sequence[dict[str, Any]]]
Loader = Callable[[ml_collections.ConfigDict], Splits]


@dataclasses.dataclass(frozen=True)
class DataSource:
  """load(config.data) -> {split: examples}, prepared where needed; the heatmap groups
  (landmark indices per heatmap channel; () for an empty channel) and the landmark
  permutation of a horizontal flip."""
  load: Loader
  groups: tuple[tuple[int, ...], ...] = lmk.GROUPS
  mirror: np.ndarray = dataclasses.field(default_factory=lambda: lmk.MIRROR)


SOURCES: Registry[DataSource] = Registry("data source")


def register_source(name: str, groups: tuple[tuple[int, ...], ...] = lmk.GROUPS,
                    mirror: Sequence[int] | None = None) -> Callable[[Loader], Loader]:
  """Decorator: register load(config.data) -> {split: examples} as data source `name`.

  config.data.name selects it as `name` or `name/<variant>` (the variant is the source's
  own business, e.g. a tfds builder config). 68-point landmarks need no groups or mirror.
  """
  if len(groups) != contract.HEATMAP_CHANNELS:
    raise ValueError(f"data source {name!r}: {len(groups)} heatmap groups, the model predicts "
                     f"{contract.HEATMAP_CHANNELS}")

  def add(load: Loader) -> Loader:
    SOURCES.add(name, DataSource(load, tuple(groups),
                                 lmk.MIRROR if mirror is None else np.asarray(mirror)))
    return load

  return add


def get_source(name: str) -> DataSource:
  """The source config.data.name selects ('face_folder/celeba' -> 'face_folder')."""
  source = SOURCES.get(name) or SOURCES.get(name.split("/", 1)[0])
  if source is None:
    raise ValueError(f"config.data.name={name!r} is not a registered data source; registered: "
                     f"{sorted(SOURCES)}")
  return source


# --- tfds-backed sources -----------------------------------------------------------------

def load_builder(cfg: ml_collections.ConfigDict, prepare: bool = True,
                 **kwargs: Any) -> tfds.core.DatasetBuilder:
  """The tfds builder named by cfg.name, preparing it first where `prepare`.

  Preparation holds a file lock beside the data set, so the processes of a run (or two
  runs) sharing a data_dir build it once while the others wait; where each host has its
  own data_dir, each builds its own copy. A prepared copy records its source
  (provenance.json) and is refused when this run's source or settings differ. A data_dir
  that is an object-store URL is read from a local copy, built or downloaded once
  (remote.py).
  """
  url = cfg.data_dir if cfg.data_dir and paths.is_url(cfg.data_dir) else None
  if url:
    paths.resolve(url, "config.data.data_dir")
  local_root = remote.local_data_dir(url) if url else (cfg.data_dir or None)
  kwargs = dict(data_dir=local_root, **kwargs)
  try:
    builder = tfds.builder(cfg.name, **kwargs)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"config.data.name={cfg.name!r} is not a known tfds data set ({first})") from e
  if not prepare:
    return builder
  manual_dir = cfg.manual_dir or None
  with provenance.build_lock(builder):
    in_bucket = url is not None and remote.fetch(url, local_root, os.fspath(builder.data_dir))
    if in_bucket or builder.is_prepared():
      builder = tfds.builder(cfg.name, **kwargs)    # another process may have just built it
      provenance.check(builder, cfg)
      if url and not in_bucket:
        remote.publish(url, local_root, os.fspath(builder.data_dir))
      return builder
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not manual_dir:
      raise ValueError(f"config.data.manual_dir must point at the prepared {cfg.name} folders "
                       "(see 'Data' in README) the first time the data set is built")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    provenance.record(builder, cfg)
    if url:
      remote.publish(url, local_root, os.fspath(builder.data_dir))
  return builder


class _Mapped(Sequence[dict[str, Any]]):
  def __init__(self, seq: Sequence[Any], fn: Callable[[Any], dict[str, Any]]):
    self.seq, self.fn = seq, fn

  def __len__(self) -> int:
    return len(self.seq)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.fn(self.seq[i])


class _TfdsSplits(Mapping[str, Sequence[dict[str, Any]]]):
  """A prepared builder's splits as array_record data sources, opened on first use, each
  record passed through `adapt` where given."""

  def __init__(self, builder: tfds.core.DatasetBuilder, name: str,
               adapt: Callable[[Any], dict[str, Any]] | None = None):
    self.builder, self.name, self.adapt = builder, name, adapt

  def __getitem__(self, split: str) -> Sequence[dict[str, Any]]:
    if self.builder.info.splits and split not in self.builder.info.splits:
      raise ValueError(f"data set {self.name} has no split {split!r}; it has "
                       f"{sorted(self.builder.info.splits)}")
    try:
      records = self.builder.as_data_source(split)
    except Exception as e:
      raise FileNotFoundError(
          f"config.data.name={self.name!r}: no prepared array_record copy in "
          f"{self.builder.data_dir} ({e}); for celeb_a run "
          "`tfds build celeb_a --file_format=array_record`") from e
    return records if self.adapt is None else _Mapped(records, self.adapt)

  @property
  def location(self) -> str:
    return str(self.builder.data_dir)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.builder.info.splits)

  def __len__(self) -> int:
    return len(self.builder.info.splits)


@register_source("synthetic_faces")
def synthetic_faces(cfg: ml_collections.ConfigDict) -> Splits:
  """The embedded procedural faces (68 exact landmarks), built on first use."""
  return _TfdsSplits(load_builder(cfg, file_format="array_record"), cfg.name)


@register_source("face_folder")
def face_folder(cfg: ml_collections.ConfigDict) -> Splits:
  """CelebA or Helen in the DIC/SPADNet folder layout under config.data.manual_dir."""
  builder = load_builder(cfg, file_format="array_record",
                         skip_bad_examples=bool(cfg.skip_bad_examples),
                         max_image_pixels=float(cfg.max_image_pixels))
  return _TfdsSplits(builder, cfg.name)


# tfds celeb_a: 178x218 aligned faces; the centred 178x178 square is resized to 128x128.
CELEBA_CROP = (0, 20, 178, 198)
CELEBA_POINTS = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
CELEBA_GROUPS = ((0,), (1,), (2,), (3, 4), ())
CELEBA_MIRROR = (1, 0, 2, 4, 3)


def celeba_example(ex: dict[str, Any]) -> dict[str, Any]:
  """tfds celeb_a record -> canonical raw example with 5 landmarks."""
  x0, y0, x1, _ = CELEBA_CROP
  size = contract.HR_SIZE
  image = Image.fromarray(ex["image"]).resize((size, size), Image.BICUBIC, box=CELEBA_CROP)
  pts = np.array([[ex["landmarks"][f"{p}_x"], ex["landmarks"][f"{p}_y"]] for p in CELEBA_POINTS],
                 np.float32)
  pts = (pts - np.array([x0, y0], np.float32) + 0.5) * (size / (x1 - x0)) - 0.5
  return {"hr": np.asarray(image), "landmarks": pts, "filename": str(ex.get("filename", ""))}


@register_source("celeb_a", groups=CELEBA_GROUPS, mirror=CELEBA_MIRROR)
def celeb_a(cfg: ml_collections.ConfigDict) -> Splits:
  """tfds celeb_a (5 landmarks), prepared by `tfds build celeb_a --file_format=array_record`."""
  return _TfdsSplits(load_builder(cfg, prepare=False), cfg.name, adapt=celeba_example)
