"""Inference over a batch a few images per shard at a time on a CPU, the whole batch elsewhere.

XLA:CPU ran the paper's x8 model at batch 8 about a fifth slower per image than at batch 1
(157 against 128 ms, Winograd convolutions, interleaved in one process): a batch's
activations (8 MiB per 64-channel tensor at 64x64) overflow the caches that one image's
fit in, and its temporaries were 4x (214 against 52 MiB). On a CPU the batch therefore
goes through the model as a loop (lax.map) over slices of a few images of each shard of
the batch (each device's share stays on its device): as many as keep the slice's largest
feature map near STEP_BYTES, since smaller models lose more to each step than they gain
(16 features, batch 20: 11.3 ms per image one at a time, 9.3 four at a time, 10.2 whole).
GPUs and TPUs, which want large batches, take it whole (ops.dispatch.by_platform). All
compute the same function; the images' float32 round-off may differ in the last bits, as
between any two batch sizes.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import numpy as np

from spadnet_jax.ops.dispatch import by_platform

Out = TypeVar("Out")
Apply = Callable[[Any, jax.Array], Out]
STEP_BYTES = 2**20   # the largest feature map of one step's images (the paper's: one image)


def images_per_step(model: Any) -> int:
  """How many images a step takes for `model` (a SPADNet): its largest feature maps, the
  last stage's (64x64 at every scale, n_feats channels), near STEP_BYTES per step."""
  per_image = 64 * 64 * model.n_feats * np.dtype(model.dtype).itemsize
  return max(1, STEP_BYTES // per_image)


def in_steps(apply: Apply, shards: int = 1, per_step: int = 1) -> Apply:
  """apply(variables, x), with x's batch run `per_step` images of each of `shards` shards
  per step on XLA:CPU.

  Args:
    apply: (variables, images (N, ...)) -> a pytree of arrays with a leading batch axis N.
    shards: how many ways the batch axis is split across devices (a mesh's size where the
      batch is split over the whole mesh): each step takes images from every shard.
    per_step: images of each shard per step at most; the largest number that divides a
      shard's images is taken (1 where the batch size is symbolic, as in jax.export). A
      batch that does not divide into the shards, or is one step, runs whole.
  """

  def looped(variables: Any, x: jax.Array, k: int) -> Out:
    n = x.shape[0]
    steps = x.reshape(shards, n // shards // k, k, *x.shape[1:]).swapaxes(0, 1)
    steps = steps.reshape(n // (shards * k), shards * k, *x.shape[1:])     # (steps, shards*k, ...)
    out = jax.lax.map(lambda images: apply(variables, images), steps)
    restore = lambda a: a.reshape(-1, shards, k, *a.shape[2:]).swapaxes(0, 1).reshape(n, *a.shape[2:])
    return jax.tree_util.tree_map(restore, out)

  def run(variables: Any, x: jax.Array) -> Out:
    n = x.shape[0]     # an int, or jax.export's symbolic batch size
    if not isinstance(n, int):
      if shards > 1:
        return apply(variables, x)
      k = 1
    elif n % shards:
      return apply(variables, x)
    else:
      k = max(d for d in range(1, min(per_step, n // shards) + 1) if (n // shards) % d == 0)
      if k * shards == n:
        return apply(variables, x)   # one step: no loop to trace and lower
    return by_platform(lambda v, x: looped(v, x, k), apply, variables, x)

  return run
