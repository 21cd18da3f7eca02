"""Validation of a training configuration, before anything is compiled.

Every problem is one ValueError naming the field and what is wrong with its value.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import ml_collections

from spadnet_jax.data import degrade

ENUMS = {
    "nonfinite": ("stop", "skip"),
    "metric_score": ("float", "png"),
    "data.lr_kernel": tuple(sorted(degrade.KERNELS)),
}
AT_LEAST_ONE = ("batch_size", "eval_batch_size", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints", "preemption_sync_every", "fsdp")
NON_NEGATIVE = ("num_epochs", "num_grid_images", "profile_steps")


def get_field(cfg: ml_collections.ConfigDict, name: str) -> Any:
  """The value of dotted field `name` (e.g. 'model.scale')."""
  value = cfg
  for part in name.split("."):
    value = value[part]
  return value


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raise ValueError for the first invalid field of a training configuration."""
  for name in AT_LEAST_ONE:
    v = get_field(cfg, name)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"config.{name}={v!r} must be an integer >= 1")
  for name in NON_NEGATIVE:
    non_negative_finite(name, get_field(cfg, name))
  if not isinstance(cfg.num_train_steps, int):
    raise ValueError(f"config.num_train_steps={cfg.num_train_steps!r} must be an integer")
  if cfg.num_train_steps <= 0 and cfg.num_epochs <= 0:
    raise ValueError(f"config.num_train_steps={cfg.num_train_steps} and config.num_epochs="
                     f"{cfg.num_epochs}: set one of them > 0 (num_train_steps wins when > 0)")
  if cfg.num_eval_images != -1 and cfg.num_eval_images < 1:
    raise ValueError(f"config.num_eval_images={cfg.num_eval_images} must be >= 1 or -1 (all)")
  for field in ("batch_size", "eval_batch_size"):
    if cfg[field] % num_devices:
      raise ValueError(f"config.{field}={cfg[field]} must be a positive multiple of the "
                       f"{num_devices} devices")
  for name, allowed in ENUMS.items():
    v = get_field(cfg, name)
    if v not in allowed:
      raise ValueError(f"config.{name}={v!r} must be one of {list(allowed)}")
  o = cfg.optimizer
  _positive_finite("optimizer.learning_rate", o.learning_rate)
  _positive_finite("optimizer.eps", o.eps)
  _positive_finite("optimizer.decay_factor", o.decay_factor)
  for name in ("b1", "b2", "ema_decay"):
    v = o[name]
    if not _is_number(v) or not 0.0 <= v < 1.0:
      raise ValueError(f"config.optimizer.{name}={v!r} must be in [0, 1)")
  non_negative_finite("optimizer.grad_clip", o.grad_clip)
  non_negative_finite("heatmap_loss_weight", cfg.heatmap_loss_weight)
  _positive_finite("data.max_image_pixels", cfg.data.max_image_pixels)
  for e in o.decay_epochs:
    if not _is_number(e) or not math.isfinite(e) or e < 0:
      raise ValueError(f"config.optimizer.decay_epochs holds {e!r}; epochs must be finite and >= 0")
  f = cfg.max_skipped_fraction
  if not _is_number(f) or not 0.0 <= f <= 1.0:
    raise ValueError(f"config.max_skipped_fraction={f!r} must be in [0, 1]")


def non_negative_finite(name: str, v: Any) -> None:
  """ValueError unless config field `name` holds a finite number >= 0."""
  if not _is_number(v) or not math.isfinite(v) or v < 0:
    raise ValueError(f"config.{name}={v!r} must be a finite number >= 0")


def _positive_finite(name: str, v: Any) -> None:
  if not _is_number(v) or not math.isfinite(v) or v <= 0:
    raise ValueError(f"config.{name}={v!r} must be a finite number > 0")


def field_names(cfg: ml_collections.ConfigDict, prefix: str = "") -> Iterable[str]:
  """Every field's dotted name, nested ones included."""
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    yield name
    if isinstance(value, ml_collections.ConfigDict):
      yield from field_names(value, f"{name}.")


def unknown_field_message(cfg: ml_collections.ConfigDict, name: str) -> str:
  """`config has no field 'foo'` with the closest known name, for a mistyped override."""
  close = difflib.get_close_matches(name, list(field_names(cfg)), n=1, cutoff=0.6)
  hint = f" (did you mean '{close[0]}'?)" if close else ""
  return f"config has no field '{name}'{hint}"
