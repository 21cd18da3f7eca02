"""Evaluation: the jit-compiled evaluator, checkpoint evaluation and the report writer.

The evaluator's last batch is padded to the fixed batch shape and masked out, so its step
compiles once; per-image results are gathered from every process. The trainer and
eval.py write the same report (metrics.json, per_image.csv, the printed table).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from spadnet_jax import checkpoint, metrics, models, sharding, visualize
from spadnet_jax.data import pipeline
from spadnet_jax.models import SPADNet, batching
from spadnet_jax.storage import files, paths

PER_IMAGE_KEYS = ("psnr_y", "ssim_y", "psnr_rgb", "nme", "bicubic_psnr_y", "bicubic_ssim_y",
                  "bicubic_psnr_rgb")


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How images are scored (metrics.image_metrics): the border cropped away, and whether the
  float output (the official protocol) or the 8-bit PNG is scored."""
  crop: int = 8
  score: str = "float"


def make_eval_step(model: SPADNet, scoring: Scoring = Scoring(), shards: int = 1) -> Callable:
  """(variables, batch) -> (per-image metrics, sr, heatmap) for one padded batch, whose
  images a CPU runs a few per shard (of `shards`) at a time (models.batching)."""
  apply = batching.in_steps(model.apply, shards, batching.images_per_step(model))

  def step(variables: Any, batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array,
                                                                 jax.Array | None]:
    sr, hm = apply(variables, batch["lr_up"])
    out = metrics.image_metrics(sr, batch["hr"], scoring.crop, scoring.score)
    bic = metrics.image_metrics(batch["lr_up"], batch["hr"], scoring.crop, scoring.score)
    out.update({f"bicubic_{k}": v for k, v in bic.items()})
    out["nme"] = (metrics.nme(hm, batch["heatmap"]) if hm is not None
                  else jnp.full(sr.shape[:1], jnp.nan))
    return out, sr, hm

  return step


def jit_eval_step(model: SPADNet, mesh: jax.sharding.Mesh, scoring: Scoring = Scoring(),
                  variables_sharding: Any = None) -> Callable:
  """make_eval_step jitted over `mesh`: the batch split over both mesh axes, the variables
  stored as `variables_sharding` (replicated by default) and placed for the model as the
  train step places them (sharding.gathered_params), the outputs replicated."""
  rep = sharding.replicated(mesh)
  step = make_eval_step(model, scoring, shards=mesh.size)     # the batch spans the mesh
  gathered = sharding.gathered_params(mesh)
  if gathered is not None:
    step = lambda variables, batch, inner=step: inner(
        jax.lax.with_sharding_constraint(variables, gathered), batch)
  return jax.jit(step,
                 in_shardings=(variables_sharding or rep, sharding.batch_sharding(mesh)),
                 out_shardings=rep)


# --- batches across processes --------------------------------------------------------------

def pad_batch(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Repeat the last example up to `size`; the mask marks the real ones."""
  n = len(batch["hr"])
  mask = np.arange(size) < n
  if n == size:
    return batch, mask
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}, mask


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Concatenate a per-process array over processes (identity with one process)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_names(names: np.ndarray, width: int = 128) -> list[str]:
  """File names of a batch from every process, in global batch order."""
  codes = np.zeros((len(names), width), np.uint8)
  for i, n in enumerate(names):
    b = str(n).encode()[:width]
    codes[i, :len(b)] = np.frombuffer(b, np.uint8)
  return [bytes(c).rstrip(b"\0").decode(errors="replace") for c in gather_rows(codes)]


def summarize(rows: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
  """Per-image rows -> mean of each metric (NaNs ignored), image count and images/s."""
  summary = {k: float(np.nanmean(v)) if len(v) else float("nan") for k, v in rows.items()}
  n = len(next(iter(rows.values()))) if rows else 0
  summary.update(num_images=n, images_per_s=n / max(seconds, 1e-9))
  return summary


class Evaluator:
  """Evaluates a model on one split; construct once, call for each set of variables."""

  def __init__(self, model: SPADNet, data: pipeline.Data, split: str, mesh: jax.sharding.Mesh,
               batch_size: int, limit: int = -1, scoring: Scoring = Scoring(),
               variables_sharding: Any = None):
    """Args:
      model: the SPADNet evaluated.
      data: the opened data set; `split` is evaluated.
      mesh: the devices the global batch is split over.
      batch_size: the global batch (a multiple of the mesh's devices); the last batch is
        padded to it and masked out.
      limit: evaluate only the first `limit` images (-1: all).
      scoring: the border crop and what is scored.
      variables_sharding: how the variables are stored (default: replicated).
    """
    self.model, self.mesh = model, mesh
    if batch_size % mesh.size:
      raise ValueError(f"eval batch size {batch_size} is not divisible by the {mesh.size} devices")
    self.batch_size = batch_size
    self.local_batch = pipeline.local_batch_size(batch_size)
    self.dataset, self.count = pipeline.eval_dataset(data, model.scale, split, self.local_batch)
    self.limit = limit
    self.step = jit_eval_step(model, mesh, scoring, variables_sharding)

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
    start = time.perf_counter()
    for i in range(n_batches):
      local, mask = pad_batch(self.dataset[min(i, len(self.dataset) - 1)], self.local_batch)
      if i >= len(self.dataset):
        mask[:] = False
      out, sr, hm = self.step(variables, sharding.global_batch(local, self.mesh))
      real = gather_rows(mask)
      for k in PER_IMAGE_KEYS:
        per_image[k].append(np.asarray(out[k])[real])
      batch_names = np.asarray(gather_names(local["filename"]))[real].tolist()
      names.extend(batch_names)
      if on_batch is not None:
        pics = {k: gather_rows(local[k])[real] for k in ("lr", "lr_up", "hr")}
        pics.update(filename=batch_names, sr=np.asarray(sr)[real],
                    heatmap=None if hm is None else np.asarray(hm)[real])
        on_batch(pics)
      if i == 0 and keep_images:
        images = {"lr": local["lr"][:keep_images], "lr_up": local["lr_up"][:keep_images],
                  "hr": local["hr"][:keep_images], "sr": np.asarray(sr)[:keep_images],
                  "heatmap": None if hm is None else np.asarray(hm)[:keep_images]}
    rows = {k: np.concatenate(v) if v else np.zeros(0) for k, v in per_image.items()}
    return {"summary": summarize(rows, time.perf_counter() - start), "per_image": rows,
            "names": names, "images": images}


# --- reports -------------------------------------------------------------------------------

def write_metrics(directory: str | os.PathLike[str], result: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> epath.Path:
  """Write metrics.json (summary) and per_image.csv under `directory` (a folder or an
  object-store URL), atomically."""
  directory = epath.Path(directory)
  summary = {**result["summary"], **(extra or {})}
  path = directory / "metrics.json"
  files.write_text(path, json.dumps(summary, indent=2, sort_keys=True))
  with files.atomic_path(directory / "per_image.csv") as tmp, \
       open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", *PER_IMAGE_KEYS])
    for i, name in enumerate(result["names"]):
      w.writerow([name, *(f"{result['per_image'][k][i]:.6f}" for k in PER_IMAGE_KEYS)])
  return path


def format_table(summary: dict[str, Any], protocol: str) -> str:
  """The evaluation table printed by train.py and eval.py."""
  lines = [f"protocol: {protocol}", "| metric | SPADNet | bicubic |", "|---|---|---|",
           f"| PSNR (Y) | {summary['psnr_y']:.3f} | {summary['bicubic_psnr_y']:.3f} |",
           f"| SSIM (Y) | {summary['ssim_y']:.4f} | {summary['bicubic_ssim_y']:.4f} |",
           f"| PSNR (RGB) | {summary['psnr_rgb']:.3f} | {summary['bicubic_psnr_rgb']:.3f} |",
           f"| NME (group centres / inter-ocular) | {summary['nme']:.4f} | - |",
           f"images: {summary['num_images']}, {summary['images_per_s']:.1f} images/s"]
  return "\n".join(lines)


def report(directory: str | os.PathLike[str], result: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
  """Write the report files and print the table (primary process); returns summary + extra.
  `extra` must hold 'protocol'."""
  if jax.process_index() == 0:
    path = write_metrics(directory, result, extra)
    print(format_table(result["summary"], extra["protocol"]), flush=True)
    print(f"wrote {path}", flush=True)
  return {**result["summary"], **extra}


def nonfinite_metrics(summary: dict[str, Any], heatmaps: bool = True) -> list[str]:
  """Names of summary metrics that are not finite (NME only where heatmaps are predicted)."""
  keys = [k for k in PER_IMAGE_KEYS if heatmaps or k != "nme"]
  return [k for k in keys if not np.isfinite(summary.get(k, np.nan))]


# --- checkpoints -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalRequest:
  """What eval.py asks of a checkpoint evaluation (its flags, the config's defaults filled in)."""
  split: str                     # the data split evaluated
  score: str                     # 'float' (official) or 'png'
  batch_size: int                # global evaluation batch
  step: int | None = None        # the checkpoint step (None: the newest intact one)
  num_images: int = -1           # only the first N images (-1: all)
  num_grids: int = 8             # comparison grids written
  save_images: bool = True       # write the SR PNGs


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, source: str | os.PathLike[str],
                        out_root: str | os.PathLike[str],
                        request: EvalRequest) -> dict[str, Any]:
  """What eval.py runs: evaluate checkpoint `source` as `request` says, with the data of
  `cfg`; the report, SR PNGs and comparison grids go to out_root/eval/<step>/. Non-finite
  metrics raise FloatingPointError."""
  mesh = sharding.make_mesh(1)
  source = paths.resolve(source, "--checkpoint")
  model, variables, step = checkpoint.load_model(source, request.step,
                                                 shardings=sharding.replicated(mesh),
                                                 pac_impl=cfg.model.pac_impl,
                                                 conv_impl=cfg.model.conv_impl)
  batch_size = request.batch_size - request.batch_size % mesh.size
  if batch_size < mesh.size:
    raise ValueError(f"eval batch size must be at least the {mesh.size} devices")
  split, score = request.split, request.score
  evaluator = Evaluator(model, pipeline.Data(cfg.data), split, mesh, batch_size,
                        limit=request.num_images, scoring=Scoring(score=score))
  out_dir = paths.resolve(out_root, "--workdir") / "eval" / str(step)
  is_main = jax.process_index() == 0
  grids_left = [request.num_grids]

  def save(batch: dict[str, Any]) -> None:
    if not is_main:
      return
    for i, name in enumerate(batch["filename"]):
      stem = os.path.splitext(os.path.basename(name))[0] or f"image{i}"
      if request.save_images:
        visualize.save_png(out_dir / "sr" / f"{stem}.png", batch["sr"][i])
      if grids_left[0] > 0:
        grids_left[0] -= 1
        hm = None if batch["heatmap"] is None else batch["heatmap"][i]
        row = visualize.comparison_row(batch["lr"][i], batch["lr_up"][i], batch["sr"][i],
                                       batch["hr"][i], hm)
        visualize.save_png(out_dir / "grids" / f"{stem}.png", row)

  result = evaluator(variables, on_batch=save)
  summary = report(out_dir, result, {
      "step": step, "checkpoint": os.fspath(source), "split": split, "data": cfg.data.name,
      "protocol": metrics.protocol(score), "score": score, "model": models.to_config(model)})
  bad = nonfinite_metrics(result["summary"], heatmaps=model.heatmap_branch)
  if bad:
    raise FloatingPointError(f"checkpoint step {step} of {source} gives "
                             f"non-finite {', '.join(bad)} on {split}")
  return summary
