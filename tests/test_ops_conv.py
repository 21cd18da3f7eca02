"""ops.conv (the model's 3x3 conv and bias add) and the Conv3x3 layer against flax's nn.Conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import ops
from spadnet_jax.models import layers
from spadnet_jax.ops import reduce


def _data(dtype=jnp.float32, shape=(2, 5, 6, 3)):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=shape), dtype), jnp.asarray(rng.normal(size=shape[-1:]), dtype))


@pytest.mark.parametrize("branch", ["cpu", "default"])
def test_bias_add_gradient_on_both_platform_branches(branch, monkeypatch):
  y, b = _data()
  if branch == "default":   # what GPUs and TPUs compile: a reduction instead of a matmul
    monkeypatch.setattr(reduce, "by_platform", lambda cpu, default, *args: default(*args))
  ct = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  dy, db = jax.vjp(ops.bias_add, y, b)[1](ct)
  np.testing.assert_array_equal(dy, ct)
  np.testing.assert_allclose(db, np.asarray(ct).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ops.bias_add(y, b), y + b)


def test_bias_add_gradient_keeps_the_bias_dtype():
  g = jnp.full((64, 64, 4), 1.0 + 2**-7, jnp.bfloat16)
  _, db = jax.vjp(ops.bias_add, g, jnp.zeros(4, jnp.bfloat16))[1](g)
  assert db.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(db, np.float32), np.full(4, 4096 * (1 + 2**-7)), rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv3x3_layer_is_flax_conv(dtype):
  """Same parameter tree and initial values as nn.Conv, same output and gradients."""
  x, _ = _data(jnp.float32, (2, 7, 5, 3))
  ours = layers.Conv3x3(4, dtype=dtype)
  theirs = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype)
  p_ours, p_theirs = ours.init(jax.random.key(3), x), theirs.init(jax.random.key(3), x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p_ours, p_theirs)
  p = jax.tree_util.tree_map(lambda a: a + 0.1, p_theirs)   # a non-zero bias
  out_ours, out_theirs = ours.apply(p, x), theirs.apply(p, x)
  assert out_ours.dtype == out_theirs.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out_ours, np.float32), np.asarray(out_theirs, np.float32),
                             rtol=tol, atol=tol)
  loss = lambda m: (lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32))))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(p, x)
  g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(p, x)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=10 * tol, atol=10 * tol), g_ours, g_theirs)
