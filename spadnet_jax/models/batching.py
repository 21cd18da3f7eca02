"""Inference over a batch one image per shard at a time on a CPU, the whole batch elsewhere.

XLA:CPU ran the paper's x8 model at batch 8 about a fifth slower per image than at batch 1
(157 against 128 ms, Winograd convolutions, interleaved in one process): a batch's
activations (8 MiB per 64-channel tensor at 64x64) overflow the caches that one image's
fit in, and its temporaries were 4x (214 against 52 MiB). On a CPU the batch therefore
goes through the model as a loop (lax.map) over slices holding one image of each shard of
the batch (each device's share stays on its device); GPUs and TPUs, which want large
batches, take it whole (ops.dispatch.by_platform). Both compute the same function; the
images' float32 round-off may differ in the last bits, as between any two batch sizes.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax

from spadnet_jax.ops.dispatch import by_platform

Out = TypeVar("Out")
Apply = Callable[[Any, jax.Array], Out]


def image_by_image(apply: Apply, shards: int = 1) -> Apply:
  """apply(variables, x), with x's batch run `shards` images per step on XLA:CPU.

  Args:
    apply: (variables, images (N, ...)) -> a pytree of arrays with a leading batch axis N.
    shards: how many ways the batch axis is split across devices (a mesh's size where the
      batch is split over the whole mesh): each step takes image i of every shard. A batch
      that does not divide into them, or holds one image per shard, runs whole.
  """

  def looped(variables: Any, x: jax.Array) -> Out:
    n = x.shape[0]
    per_shard = n // shards
    steps = x.reshape(shards, per_shard, *x.shape[1:]).swapaxes(0, 1)   # (per_shard, shards, ...)
    out = jax.lax.map(lambda images: apply(variables, images), steps)
    return jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1).reshape(n, *a.shape[2:]), out)

  def run(variables: Any, x: jax.Array) -> Out:
    n = x.shape[0]     # an int, or jax.export's symbolic batch size
    if (shards > 1 and n % shards) or (isinstance(n, int) and n <= shards):
      return apply(variables, x)    # not divisible, or one step: no loop to trace and lower
    return by_platform(looped, apply, variables, x)

  return run
