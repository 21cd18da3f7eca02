"""Orbax checkpoints that carry their model configuration.

Layout (an Orbax CheckpointManager directory): each step holds the items
  'model'  - JSON: the SPADNet fields, so the checkpoint alone rebuilds the model;
  'params' - the model variables used for inference (EMA weights when training keeps them);
and a training run adds 'train' (optimizer state and counters) and 'data' (iterator state).
eval.py, predict and the converter read only 'model' and 'params'.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from spadnet_jax.models import SPADNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(model: SPADNet) -> dict[str, Any]:
  """The model's constructor fields as JSON-ready data."""
  cfg = {}
  for f in dataclasses.fields(SPADNet):
    if f.name in ("parent", "name"):
      continue
    value = getattr(model, f.name)
    cfg[f.name] = jnp.dtype(value).name if f.name == "dtype" else value
  return cfg


def model_from_config(cfg: dict[str, Any], **overrides: Any) -> SPADNet:
  """Rebuild a SPADNet from `model_config` output; unknown fields are an error."""
  cfg = {**cfg, **overrides}
  known = {f.name for f in dataclasses.fields(SPADNet)} - {"parent", "name"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"model configuration has unknown fields {unknown}; known: {sorted(known)}")
  if isinstance(cfg.get("dtype"), str):
    cfg["dtype"] = _DTYPES[cfg["dtype"]]
  model = SPADNet(**cfg)
  model.check()
  return model


def save_inference_checkpoint(directory: str, model: SPADNet, variables: Any, step: int = 0) -> str:
  """Write `variables` and the model configuration as step `step` under `directory`.

  Refuses to replace an existing step (nothing already written is ever lost); Orbax
  writes to a temporary folder and renames it, so a crash leaves no half checkpoint.
  """
  directory = os.path.abspath(directory)
  with ocp.CheckpointManager(directory) as mngr:
    if step in mngr.all_steps():
      raise FileExistsError(f"{directory} already holds a checkpoint at step {step}; "
                            "choose another directory")
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.JsonSave(model_config(model)),
        params=ocp.args.StandardSave(variables)))
    mngr.wait_until_finished()
  return os.path.join(directory, str(step))


def _manager_and_step(path: str, step: int | None) -> tuple[str, int]:
  """Accept a CheckpointManager directory (latest or given step) or one step folder."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  base = os.path.basename(path.rstrip("/"))
  if step is None and base.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(base)
  steps = ocp.utils.checkpoint_steps(path)
  if not steps:
    raise FileNotFoundError(f"{path} holds no checkpoint steps (expected folders named by step "
                            "with 'model' and 'params' inside)")
  if step is None:
    return path, max(steps)
  if step not in steps:
    raise FileNotFoundError(f"{path} has no step {step}; it has {sorted(steps)}")
  return path, step


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager that knows the handlers of the items inference needs."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"model": ocp.JsonCheckpointHandler(),
                     "params": ocp.StandardCheckpointHandler()})


def read_model_config(path: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """The JSON model configuration stored with a checkpoint, and its step."""
  directory, step = _manager_and_step(path, step)
  with _reader(directory) as mngr:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    except Exception as e:
      raise ValueError(f"checkpoint {directory}/{step}/model (the model configuration) is "
                       f"corrupt or unreadable: {e}") from e
  if not isinstance(restored["model"], dict):
    raise ValueError(f"checkpoint {directory}/{step}/model holds no model configuration")
  return dict(restored["model"]), step


def load_model(path: str, step: int | None = None,
               shardings: Any = None, **overrides: Any) -> tuple[SPADNet, Any, int]:
  """Rebuild the model and restore its variables from a checkpoint.

  `overrides` change fields that do not alter parameters (e.g. pac_impl, dtype).
  Parameters whose shapes differ from what the configuration implies are reported by
  name. `shardings` (a pytree of jax.sharding.Sharding, or one for all leaves) places
  the restored arrays; default: replicated on the first device.
  """
  cfg, step = read_model_config(path, step)
  model = model_from_config(cfg, **overrides)
  directory, _ = _manager_and_step(path, step)
  abstract = abstract_variables(model)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)
  else:
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  where = os.path.join(directory, str(step), "params")
  with _reader(directory) as mngr:
    try:
      meta = mngr.item_metadata(step)["params"]
    except Exception as e:
      raise ValueError(f"checkpoint {where} is corrupt or unreadable: {e}") from e
    if meta is None:
      raise ValueError(f"checkpoint {where} is corrupt or unreadable: no parameter metadata")
    check_tree_matches(abstract, meta, where)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise ValueError(f"checkpoint {where} is corrupt or unreadable: {e}") from e
  return model, restored["params"], step


def abstract_variables(model: SPADNet) -> Any:
  """Shapes and dtypes of the model's variables, computed without allocating them."""
  return jax.eval_shape(model.init, jax.random.key(0), model.example_input())


def check_tree_matches(expected: Any, found: Any, where: str) -> None:
  """Raise ValueError naming the first missing, unexpected or mis-shaped parameter."""
  exp = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(found)}
  missing = sorted(set(exp) - set(got))
  extra = sorted(set(got) - set(exp))
  if missing or extra:
    raise ValueError(f"checkpoint {where} does not match the model configuration: "
                     f"missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                     f"unexpected parameters {extra[:5]}{'...' if len(extra) > 5 else ''}")
  for key, e in exp.items():
    shape = tuple(getattr(got[key], "shape", ()))
    if shape != tuple(e.shape):
      raise ValueError(f"checkpoint {where}: parameter {key} has shape {shape}, the model "
                       f"configuration needs {tuple(e.shape)}")
