"""Older configuration forms -> today's: the one place that knows them (as big_vision's
models/vit.py fix_old_checkpoints).

configs/default.py is the one source of defaults; code reads `cfg.data.num_threads`, never
`cfg.get(field, default)`. A configuration written before a field existed (a run's
config.json, a checkpoint's model JSON) is brought to today's form here first.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

# SPADNet.remat before it took names.
_REMAT_BOOLEANS = {True: "all", False: "none"}


def upgrade_model_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
  """A model configuration (config.model, a checkpoint's 'model' JSON) in today's form:
  remat True/False -> 'all'/'none'; a negative hab_num (the placeholder before None meant
  number - 1) -> None."""
  out = dict(fields)
  if isinstance(out.get("remat"), bool):
    out["remat"] = _REMAT_BOOLEANS[out["remat"]]
  hab_num = out.get("hab_num")
  if isinstance(hab_num, int) and not isinstance(hab_num, bool) and hab_num < 0:
    out["hab_num"] = None
  return out


def _fill(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  """Give `cfg` every field of `defaults` it lacks, at any depth (in place)."""
  with cfg.unlocked():
    for name, value in defaults.items():
      if name not in cfg:
        cfg[name] = copy.deepcopy(value)
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(cfg[name], ml_collections.ConfigDict):
        _fill(cfg[name], value)


def upgrade_config(cfg: ml_collections.ConfigDict,
                   defaults: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A copy of a training configuration in today's form.

  - Fields it lacks take their value from `defaults` (configs/default.py's get_config(),
    given by the program: a config.json written before the field existed).
  - config.model: upgrade_model_fields.
  - heatmap_loss_weight, the weight of the heatmap loss before config.loss named its terms,
    is folded into every heatmap_* term's weight and set to 1.

  Today's configurations come back equal. A heatmap_loss_weight that is not a finite
  number >= 0 is left for config_check to name.
  """
  from spadnet_jax import config_check  # pylint: disable=import-outside-toplevel
  out = copy.deepcopy(cfg)
  if defaults is not None:
    _fill(out, defaults)
  with out.unlocked():
    if "model" in out:
      fields = upgrade_model_fields(out.model.to_dict())
      for name in ("remat", "hab_num"):
        if name in fields and fields[name] != out.model[name]:
          del out.model[name]            # the old value's type would refuse the new one
          out.model[name] = fields[name]
    weight = out.get("heatmap_loss_weight")
    try:
      config_check.non_negative_finite("heatmap_loss_weight", weight)
    except ValueError:
      return out
    if weight != 1.0 and "loss" in out:
      for name in out.loss:
        if name.startswith("heatmap_"):
          out.loss[name] = float(out.loss[name]) * weight
      out.heatmap_loss_weight = 1.0
  return out
