"""models.batching: a batch through the model a few images per shard at a time on a CPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import models
from spadnet_jax.models import batching
from spadnet_jax.ops import dispatch


@pytest.fixture(scope="module")
def tiny():
  model = models.SPADNet(scale=8, n_feats=8, number=1, reduction=2)
  variables = model.init(jax.random.key(0), model.example_input())
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 128, 128, 3)), jnp.float32)
  return model, variables, x


@pytest.mark.parametrize("shards,per_step", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 3)])
def test_steps_compute_the_batch_in_its_order(tiny, shards, per_step):
  model, variables, x = tiny
  x = jnp.concatenate([x, x[::-1] * 0.5])        # 8 distinct images
  want = model.apply(variables, x)
  run = jax.jit(batching.in_steps(model.apply, shards, per_step))
  got = run(variables, x)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)
  # every image is its own: swapping two inputs swaps exactly those outputs
  swapped = run(variables, x[jnp.array([1, 0, 2, 3, 4, 5, 6, 7])])
  np.testing.assert_allclose(swapped[0][0], got[0][1], rtol=0, atol=2e-5)


def _steps(model, variables, x, shards=1, per_step=1):
  """The loop's trip count in the CPU program, 0 where the batch runs whole."""
  hlo = jax.jit(batching.in_steps(model.apply, shards, per_step)).lower(variables, x).compile().as_text()
  return int(re.search(r'"known_trip_count":\{"n":"(\d+)"', hlo).group(1)) if "while" in hlo else 0


def test_a_cpu_loops_and_other_platforms_take_the_batch_whole(tiny):
  model, variables, x = tiny
  assert _steps(model, variables, x) == 4 and _steps(model, variables, x, shards=2) == 2
  assert _steps(model, variables, x, per_step=2) == 2
  assert _steps(model, variables, x, per_step=3) == 2     # 3 does not divide 4: 2 per step
  assert _steps(model, variables, x, shards=3) == 0       # 4 images do not divide into 3 shards
  assert _steps(model, variables, x, shards=4) == 0 and _steps(model, variables, x[:1]) == 0
  assert _steps(model, variables, x, per_step=4) == 0     # one step: no loop
  with dispatch.traced_for("gpu"):
    jaxpr = jax.make_jaxpr(batching.in_steps(model.apply))(variables, x)
  assert "scan" not in str(jaxpr)


def test_images_per_step_keep_the_largest_feature_map_near_a_mebibyte():
  assert batching.images_per_step(models.SPADNet(n_feats=64)) == 1      # the paper's: 1 MiB each
  assert batching.images_per_step(models.SPADNet(n_feats=16)) == 4      # configs/default.py
  assert batching.images_per_step(models.SPADNet(n_feats=16, dtype=jnp.bfloat16)) == 8
  assert batching.images_per_step(models.SPADNet(n_feats=128)) == 1


def test_the_benchmarks_count_flops_over_the_whole_batch(tiny):
  """XLA's cost analysis counts a loop's body once: the FLOP count (benchmarks/run.py,
  official.py) takes the batch whole, the timed step image by image."""
  from benchmarks import run, steps
  model, variables, _ = tiny
  params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables["params"])
  specs = lambda b: [params, {"lr_up": jax.ShapeDtypeStruct((b, 128, 128, 3), jnp.float32)}]
  per_image = [run.xla_flops(steps.step_fn(model, "inference", for_counting=True), specs(b)) / b
               for b in (1, 2)]
  assert per_image[0] > 0 and per_image[0] == pytest.approx(per_image[1], rel=1e-3)
  # the timed step of this 8-feature model takes 8 images per step: 2 steps for 16
  assert run.xla_flops(steps.step_fn(model, "inference"), specs(16)) / 16 < 0.6 * per_image[1]
