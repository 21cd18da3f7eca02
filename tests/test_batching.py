"""models.batching: a batch through the model one image per shard at a time on a CPU."""
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


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_image_by_image_computes_the_batch_in_its_order(tiny, shards):
  model, variables, x = tiny
  want = model.apply(variables, x)
  got = jax.jit(batching.image_by_image(model.apply, shards))(variables, x)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)
  # every image is its own: swapping two inputs swaps exactly those outputs
  swapped = jax.jit(batching.image_by_image(model.apply, shards))(variables, x[jnp.array([1, 0, 2, 3])])
  np.testing.assert_allclose(swapped[0][0], got[0][1], rtol=0, atol=2e-5)


def test_a_cpu_loops_and_other_platforms_take_the_batch_whole(tiny):
  model, variables, x = tiny
  loops = lambda shards, x=x: "while" in jax.jit(batching.image_by_image(model.apply, shards)).lower(
      variables, x).compile().as_text()
  assert loops(1) and loops(2)
  assert not loops(3)          # 4 images do not divide into 3 shards: the batch runs whole
  assert not loops(4) and not loops(1, x[:1])     # one step: no loop
  with dispatch.traced_for("gpu"):
    jaxpr = jax.make_jaxpr(batching.image_by_image(model.apply))(variables, x)
  assert "scan" not in str(jaxpr)


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
  assert run.xla_flops(steps.step_fn(model, "inference"), specs(2)) / 2 < 0.6 * per_image[1]
