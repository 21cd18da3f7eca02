"""What eval.py runs: restore a checkpoint, evaluate a split, write reports and pictures."""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from spadnet_jax import checkpoint, evaluation, sharding, visualize


def protocol(score: str, crop: int = 8) -> str:
  return (f"PSNR/SSIM on Y (ITU-R BT.601, MATLAB rgb2ycbcr) and PSNR on RGB, border {crop} px "
          f"cropped, SSIM 11x11 Gaussian sigma 1.5 (the official util.py / SFMNet-DIC protocol); "
          f"scoring the {'float network output (official)' if score == 'float' else '8-bit PNG'}")


def run(cfg: ml_collections.ConfigDict, source: str, step: int | None, out_root: str, split: str,
        score: str, batch_size: int, num_images: int = -1, num_grids: int = 8,
        save_images: bool = True) -> dict[str, Any]:
  """Evaluate checkpoint `source` on `split`; results go to out_root/eval/<step>/."""
  mesh = sharding.make_mesh(1)
  model, variables, step = checkpoint.load_model(source, step, shardings=sharding.replicated(mesh),
                                                 pac_impl=cfg.model.get("pac_impl", "auto"))
  batch_size -= batch_size % mesh.size
  if batch_size < mesh.size:
    raise ValueError(f"eval batch size must be at least the {mesh.size} devices")
  evaluator = evaluation.Evaluator(model, cfg.data, split, mesh, batch_size, limit=num_images,
                                   score=score)
  out_dir = os.path.join(os.path.abspath(out_root), "eval", str(step))
  is_main = jax.process_index() == 0
  grids_left = [num_grids]

  def save(batch: dict[str, Any]) -> None:
    if not is_main:
      return
    for i, name in enumerate(batch["filename"]):
      stem = os.path.splitext(os.path.basename(name))[0] or f"image{i}"
      if save_images:
        visualize.save_png(os.path.join(out_dir, "sr", f"{stem}.png"), batch["sr"][i])
      if grids_left[0] > 0:
        grids_left[0] -= 1
        hm = None if batch["heatmap"] is None else batch["heatmap"][i]
        row = visualize.comparison_row(batch["lr"][i], batch["lr_up"][i], batch["sr"][i],
                                       batch["hr"][i], hm)
        visualize.save_png(os.path.join(out_dir, "grids", f"{stem}.png"), row)

  result = evaluator(variables, on_batch=save)
  text = protocol(score)
  extra = {"step": step, "checkpoint": os.path.abspath(source), "split": split,
           "data": cfg.data.name, "protocol": text, "score": score,
           "model": checkpoint.model_config(model)}
  if is_main:
    path = evaluation.write_metrics(out_dir, result, extra)
    print(evaluation.format_table(result["summary"], text), flush=True)
    print(f"wrote {path}", flush=True)
  bad = evaluation.nonfinite_metrics(result["summary"], heatmaps=model.heatmap_branch)
  if bad:
    raise FloatingPointError(f"checkpoint step {step} of {os.path.abspath(source)} gives "
                             f"non-finite {', '.join(bad)} on {split}")
  return {**result["summary"], **extra}
