"""ops.reduce: the ones-vector sums XLA:CPU runs and the reductions GPUs/TPUs run, against NumPy."""
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import ops
from spadnet_jax.ops import reduce


@pytest.fixture(params=["cpu", "default"])
def branch(request, monkeypatch):
  """Run each test on the CPU branch (what this machine compiles) and on the accelerators' one."""
  if request.param == "default":
    monkeypatch.setattr(reduce, "by_platform", lambda cpu, default, *args: default(*args))
  return request.param


def test_channel_sum_sums_every_axis_but_the_last(branch, rng):
  g = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  s = ops.channel_sum(jnp.asarray(g))
  assert s.shape == (3,) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, g.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


def test_feature_sum_sums_the_last_axis_keeping_it(branch, rng):
  v = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
  s = ops.feature_sum(jnp.asarray(v))
  assert s.shape == (2, 5, 6, 1) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, v.sum(-1, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, shape", [(ops.channel_sum, (64, 64, 4)),
                                       (ops.feature_sum, (3, 4096))])
def test_sums_accumulate_bfloat16_in_float32(branch, fn, shape):
  v = jnp.full(shape, 1.0 + 2**-7, jnp.bfloat16)   # 4096 terms: a running bfloat16 sum stops at 512
  s = fn(v)
  assert s.dtype == jnp.float32
  np.testing.assert_allclose(s, np.full(s.shape, 4096 * (1 + 2**-7)), rtol=1e-6)
