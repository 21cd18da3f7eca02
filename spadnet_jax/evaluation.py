"""Jit-compiled, sharded evaluation over a data split with the official metrics.

The last batch is padded to the fixed batch shape and masked out, so the step compiles
once; per-image results are gathered from every process.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from spadnet_jax import files, metrics, sharding
from spadnet_jax.data import pipeline
from spadnet_jax.models import SPADNet

PER_IMAGE_KEYS = ("psnr_y", "ssim_y", "psnr_rgb", "nme", "bicubic_psnr_y", "bicubic_ssim_y",
                  "bicubic_psnr_rgb")


def make_eval_step(model: SPADNet, crop: int = 8, score: str = "float") -> Callable:
  """(variables, batch) -> (per-image metrics, sr, heatmap) for one padded batch."""

  def step(variables, batch):
    sr, hm = model.apply(variables, batch["lr_up"])
    out = metrics.image_metrics(sr, batch["hr"], crop, score)
    bic = metrics.image_metrics(batch["lr_up"], batch["hr"], crop, score)
    out.update({f"bicubic_{k}": v for k, v in bic.items()})
    out["nme"] = (metrics.nme(hm, batch["heatmap"]) if hm is not None
                  else jnp.full(sr.shape[:1], jnp.nan))
    return out, sr, hm

  return step


def _pad(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  n = len(batch["hr"])
  mask = np.arange(size) < n
  if n == size:
    return batch, mask
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}, mask


def _gather(x: np.ndarray) -> np.ndarray:
  """Concatenate a per-process array over processes (identity with one process)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_names(names: np.ndarray, width: int = 128) -> list[str]:
  """File names of a batch from every process, in global batch order."""
  codes = np.zeros((len(names), width), np.uint8)
  for i, n in enumerate(names):
    b = str(n).encode()[:width]
    codes[i, :len(b)] = np.frombuffer(b, np.uint8)
  codes = _gather(codes)
  return [bytes(c).rstrip(b"\0").decode(errors="replace") for c in codes]


class Evaluator:
  """Evaluates a model on one split; construct once, call for each set of variables."""

  def __init__(self, model: SPADNet, data_cfg: ml_collections.ConfigDict, split: str,
               mesh: jax.sharding.Mesh, batch_size: int, limit: int = -1, crop: int = 8,
               score: str = "float", variables_sharding: Any = None):
    self.model, self.mesh = model, mesh
    if batch_size % mesh.size:
      raise ValueError(f"eval batch size {batch_size} is not divisible by the {mesh.size} devices")
    self.batch_size = batch_size
    self.local_batch = pipeline.local_batch_size(batch_size)
    self.dataset, self.count = pipeline.eval_dataset(data_cfg, model.scale, split, self.local_batch)
    self.limit = limit
    rep = sharding.replicated(mesh)
    self.step = jax.jit(make_eval_step(model, crop, score),
                        in_shardings=(variables_sharding or rep, sharding.batch_sharding(mesh)),
                        out_shardings=rep)

  def __call__(self, variables: Any, keep_images: int = 0,
               on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
               limit: int | None = None) -> dict[str, Any]:
    """Mean metrics, per-image rows, images/s, and the first `keep_images` outputs.

    `on_batch` (e.g. to save pictures) receives each global batch's real (unpadded)
    examples: filename, lr, lr_up, hr and the model's sr and heatmap, on every process.
    `limit` overrides the constructor's image limit (-1: the whole split).
    """
    per_image = {k: [] for k in PER_IMAGE_KEYS}
    names, images = [], None
    n_batches = len(self.dataset)
    if jax.process_count() > 1:   # every process must run the same number of steps
      n_batches = int(multihost_utils.process_allgather(np.array(n_batches)).max())
    limit = self.limit if limit is None else limit
    if limit >= 0:
      n_batches = min(n_batches, -(-limit // self.batch_size))
    start, seen = time.perf_counter(), 0
    for i in range(n_batches):
      local = self.dataset[min(i, len(self.dataset) - 1)]
      local, mask = _pad(local, self.local_batch)
      if i >= len(self.dataset):
        mask[:] = False
      out, sr, hm = self.step(variables, sharding.global_batch(local, self.mesh))
      gathered_mask = _gather(mask)
      for k in PER_IMAGE_KEYS:
        per_image[k].append(np.asarray(out[k])[gathered_mask])
      batch_names = np.asarray(_gather_names(local["filename"]))[gathered_mask].tolist()
      names.extend(batch_names)
      if on_batch is not None:
        pics = {k: _gather(local[k])[gathered_mask] for k in ("lr", "lr_up", "hr")}
        pics.update(filename=batch_names, sr=np.asarray(sr)[gathered_mask],
                    heatmap=None if hm is None else np.asarray(hm)[gathered_mask])
        on_batch(pics)
      seen += int(gathered_mask.sum())
      if i == 0 and keep_images:
        images = {"lr": local["lr"][:keep_images], "lr_up": local["lr_up"][:keep_images],
                  "hr": local["hr"][:keep_images], "sr": np.asarray(sr)[:keep_images],
                  "heatmap": None if hm is None else np.asarray(hm)[:keep_images]}
    elapsed = time.perf_counter() - start
    rows = {k: np.concatenate(v) if v else np.zeros(0) for k, v in per_image.items()}
    summary = {k: float(np.nanmean(v)) if len(v) else float("nan") for k, v in rows.items()}
    summary.update(num_images=seen, images_per_s=seen / max(elapsed, 1e-9))
    return {"summary": summary, "per_image": rows, "names": names, "images": images}


def write_metrics(directory: str, result: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
  """Write metrics.json (summary) and per_image.csv under `directory`, atomically."""
  os.makedirs(directory, exist_ok=True)
  summary = {**result["summary"], **(extra or {})}
  path = os.path.join(directory, "metrics.json")
  with files.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  with files.atomic_path(os.path.join(directory, "per_image.csv")) as tmp, \
       open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", *PER_IMAGE_KEYS])
    for i, name in enumerate(result["names"]):
      w.writerow([name, *(f"{result['per_image'][k][i]:.6f}" for k in PER_IMAGE_KEYS)])
  return path


def nonfinite_metrics(summary: dict[str, Any], heatmaps: bool = True) -> list[str]:
  """Names of summary metrics that are not finite (NME only where heatmaps are predicted)."""
  keys = [k for k in PER_IMAGE_KEYS if heatmaps or k != "nme"]
  return [k for k in keys if not np.isfinite(summary.get(k, np.nan))]


def format_table(summary: dict[str, Any], protocol: str) -> str:
  """The evaluation table printed by train.py and eval.py."""
  lines = [f"protocol: {protocol}", "| metric | SPADNet | bicubic |", "|---|---|---|",
           f"| PSNR (Y) | {summary['psnr_y']:.3f} | {summary['bicubic_psnr_y']:.3f} |",
           f"| SSIM (Y) | {summary['ssim_y']:.4f} | {summary['bicubic_ssim_y']:.4f} |",
           f"| PSNR (RGB) | {summary['psnr_rgb']:.3f} | {summary['bicubic_psnr_rgb']:.3f} |",
           f"| NME (group centres / inter-ocular) | {summary['nme']:.4f} | - |",
           f"images: {summary['num_images']}, {summary['images_per_s']:.1f} images/s"]
  return "\n".join(lines)
