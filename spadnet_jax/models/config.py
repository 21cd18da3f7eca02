"""SPADNet <-> its configuration (config.model, a checkpoint's 'model' JSON, the converter's).

One place builds and validates a model from data, so the trainer, checkpoints and tools
agree on what a configuration means.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from spadnet_jax import config_upgrade
from spadnet_jax.models.spadnet import SPADNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FIELDS = tuple(f.name for f in dataclasses.fields(SPADNet) if f.name not in ("parent", "name"))


def to_config(model: SPADNet) -> dict[str, Any]:
  """The model's constructor fields as JSON-ready data (dtype by name)."""
  return {name: jnp.dtype(getattr(model, name)).name if name == "dtype" else getattr(model, name)
          for name in FIELDS}


def from_config(fields: Mapping[str, Any] | ml_collections.ConfigDict,
                **overrides: Any) -> SPADNet:
  """Build and validate the SPADNet `fields` describe (to_config output, config.model,
  in any older form config_upgrade knows).

  Unknown fields and invalid values raise ValueError naming them.
  """
  if isinstance(fields, ml_collections.ConfigDict):
    fields = fields.to_dict()
  cfg = config_upgrade.upgrade_model_fields({**fields, **overrides})
  unknown = sorted(set(cfg) - set(FIELDS))
  if unknown:
    raise ValueError(f"model configuration has unknown fields {unknown}; known: {sorted(FIELDS)}")
  if isinstance(cfg.get("dtype"), str):
    if cfg["dtype"] not in DTYPES:
      raise ValueError(f"SPADNet.dtype must be one of {sorted(DTYPES)}, got {cfg['dtype']!r}")
    cfg["dtype"] = DTYPES[cfg["dtype"]]
  try:
    return SPADNet(**cfg)
  except TypeError as e:
    raise ValueError(f"model configuration: {e}") from e
