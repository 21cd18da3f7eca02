"""Device mesh, partition rules and host<->global array placement, all via jax.sharding.

Mesh axes: 'data' (batch) and 'fsdp' (batch too, plus parameter/optimizer sharding when
its size is > 1). Partition rules are (regex over the parameter path, PartitionSpec)
pairs, first match wins, as in big_vision; 'fsdp_auto' shards the largest divisible axis.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices, with Auto axis types (see JAX_NOTES)."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.fsdp={fsdp} must divide the {len(devices)} devices")
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over both mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def gathered_params(mesh: Mesh) -> NamedSharding | None:
  """Where parameters sit while the model computes: gathered whole (replicated) when the
  mesh shards them (fsdp > 1; left alone, XLA splits the activations by channel instead,
  docs/performance.md), else None (as stored). The train and eval steps both follow it."""
  return replicated(mesh) if mesh.shape["fsdp"] > 1 else None


def _fsdp_spec(shape: tuple[int, ...], size: int, min_size: int) -> P:
  """Shard the largest axis divisible by the fsdp size; small arrays stay replicated."""
  if size == 1 or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def partition_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                    min_size: int = 2 ** 14) -> Any:
  """PartitionSpec per leaf: the first rule whose regex matches the leaf's path, where a
  rule's spec 'fsdp_auto' (or no matching rule) means _fsdp_spec."""
  size = mesh.shape["fsdp"]

  def spec(path: tuple[Any, ...], leaf: Any) -> P:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    shape = tuple(getattr(leaf, "shape", ()))
    for pattern, rule in rules:
      if re.search(pattern, name):
        return _fsdp_spec(shape, size, min_size) if rule == "fsdp_auto" else P(*rule)
    return _fsdp_spec(shape, size, min_size)

  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ()) -> Any:
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, rules))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's numeric arrays into global arrays sharded over the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()
          if v.dtype.kind == "f"}
