"""The data contract: what every source's examples become and what the model steps receive.

A batch is {'hr', 'lr_up': (B, 128, 128, 3), 'lr': (B, 128/scale, 128/scale, 3),
'heatmap': (B, 128, 128, 5)} float32 in [0, 1] (heatmaps: unnormalised Gaussians, peak 1),
plus 'filename' on the host. The trainer, the evaluator, predict and the benchmarks
shape their inputs from here.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spadnet_jax.data import landmarks

HR_SIZE = 128
HEATMAP_CHANNELS = len(landmarks.GROUPS)


def lr_size(scale: int) -> int:
  """Side of the LR input at `scale` (16 at x8)."""
  if HR_SIZE % scale:
    raise ValueError(f"scale {scale} does not divide the {HR_SIZE}-pixel HR size")
  return HR_SIZE // scale


def batch_shapes(batch: int, scale: int) -> dict[str, tuple[int, ...]]:
  """Shape of every array of a batch of `batch` examples at `scale`."""
  return {"hr": (batch, HR_SIZE, HR_SIZE, 3), "lr": (batch, lr_size(scale), lr_size(scale), 3),
          "lr_up": (batch, HR_SIZE, HR_SIZE, 3),
          "heatmap": (batch, HR_SIZE, HR_SIZE, HEATMAP_CHANNELS)}


def batch_spec(batch: int, scale: int, sharding: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract batch for ahead-of-time compilation (optionally carrying a sharding)."""
  return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
          for k, s in batch_shapes(batch, scale).items()}


def random_batch(batch: int, scale: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of uniform noise with the contract's shapes (benchmarks, smoke tests)."""
  rng = np.random.default_rng(seed)
  return {k: rng.random(s, np.float32) for k, s in batch_shapes(batch, scale).items()}
