"""The model's SR function as a serialized JAX program (jax.export), weights as arguments.

An exported program is StableHLO with its input shapes: running it needs jax alone (no
Flax, no Orbax, no tracing of the model), and it compiles on any machine whose platform it
was exported for. The variables are an argument rather than constants baked into the
program, so the artifact stays small (about 0.3 MB for the paper's x8 model), the weights
are stored once beside it, and loading the compiled program does not copy them again.
The batch dimension is symbolic: one artifact serves every batch size.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from spadnet_jax.data import contract


def sr_function(model: Any) -> Callable[[Any, Any], Any]:
  """(variables, images (N, 128, 128, 3) in [0, 1]) -> the SR images, the heatmap dropped;
  a few images at a time on a CPU (models.batching; one, as the batch size is symbolic)."""
  # Here, not at the top: loading a stored program (program_cache) must not import Flax.
  from spadnet_jax.models import batching  # pylint: disable=import-outside-toplevel
  return batching.in_steps(lambda variables, x: model.apply(variables, x)[0])


def export_sr(model: Any, variables: Any, platforms: Sequence[str] | None = None) -> jax.export.Exported:
  """jax.export of sr_function(model) for any batch size, for `platforms` (default: this
  process's backend)."""
  (batch,) = jax.export.symbolic_shape("batch")
  images = jax.ShapeDtypeStruct((batch, contract.HR_SIZE, contract.HR_SIZE, 3), np.float32)
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), variables)
  return jax.export.export(jax.jit(sr_function(model)), platforms=platforms)(abstract, images)


def flat_variables(variables: Any) -> dict[str, np.ndarray]:
  """The nested variable dicts as {'params/head/kernel': array}, for an .npz."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    out["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return out


def nested_variables(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """flat_variables inverted."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out
