"""ops.conv (the model's 3x3 conv and bias add) and the Conv3x3 layer against flax's nn.Conv."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import ops, process_setup
from spadnet_jax.models import layers
from spadnet_jax.ops import conv, reduce


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


@pytest.mark.parametrize("shape,cout", [((1, 64, 64, 16), 16), ((2, 7, 5, 3), 4), ((1, 6, 8, 32), 48)])
def test_winograd_computes_the_convolution(shape, cout):
  """F(2x2, 3x3) against XLA's convolution, odd sizes (padded to whole blocks) included:
  float32 round-off apart (a wrong transform is off by the outputs' own size, ~1)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1]), jnp.float32)
  want = ops.conv3x3(x, w, impl="xla")
  got = conv.conv3x3_winograd(x, w)
  assert got.shape == want.shape == shape[:3] + (cout,)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))


def test_winograd_gradients_are_the_direct_convolutions():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 8, 6, 7)), jnp.float32)
  ours = jax.vjp(conv.conv3x3_winograd, x, w)[1](g)
  direct = jax.vjp(lambda x, w: ops.conv3x3(x, w, impl="xla"), x, w)[1](g)
  for a, b in zip(ours, direct):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size,cin,cout,expected", [
    (64, 16, 16, True), (63, 16, 16, False), (32, 64, 64, False), (128, 8, 3, False),
    (128, 9, 9, True), (64, 32, 16, True), (64, 16, 64, False)])
def test_winograd_formulation_runs_where_it_pays(size, cin, cout, expected):
  """'winograd' compiles to no convolution on a CPU exactly where ops.winograd_pays says
  (64x64 images and up, more than 8 outputs and no more than the inputs, float32); 'xla'
  always to XLA's convolution."""
  x = jnp.zeros((1, size, size, cin), jnp.float32)
  w = jnp.zeros((3, 3, cin, cout), jnp.float32)
  assert ops.winograd_pays(x.shape, w.shape, x.dtype) is expected
  assert not ops.winograd_pays(x.shape, w.shape, jnp.bfloat16)
  assert not ops.winograd_pays((2,) + x.shape[1:], w.shape, x.dtype)   # one image per call
  hlo = {impl: jax.jit(lambda x, w, impl=impl: ops.conv3x3(x, w, impl=impl)).lower(x, w).compile().as_text()
         for impl in ("winograd", "xla")}
  assert ("convolution(" not in hlo["winograd"]) is expected
  assert "convolution(" in hlo["xla"]


@pytest.mark.parametrize("flags,off", [
    ("--xla_cpu_experimental_ynn_fusion_type=", True), ("", False), ("--foo=1", False),
    ("--xla_cpu_experimental_ynn_fusion_type=dot", False),
    ("--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type=", True),
    ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_ynn_fusion_type=-dot", False)])
def test_ynn_fusions_off_reads_the_last_flag(flags, off):
  assert conv.ynn_fusions_off({"XLA_FLAGS": flags}) is off
  assert conv.ynn_fusions_off({}) is False
  assert conv.YNN_FUSION_FLAG + "=" in process_setup.CPU_FLAGS   # what our programs set


def test_winograd_leaves_processes_with_ynn_fusions_to_xlas_convolution(monkeypatch):
  """Where XLA's YNN fusions are on (a user's own process), they make the transforms slow:
  'winograd' compiles to XLA's convolution there, and to none under our programs' flags."""
  x, w = jnp.zeros((1, 64, 64, 16), jnp.float32), jnp.zeros((3, 3, 16, 16), jnp.float32)

  def hlo():
    return jax.jit(lambda x, w: ops.conv3x3(x, w, impl="winograd")).lower(x, w).compile().as_text()
  assert "convolution(" not in hlo()
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert "convolution(" in hlo()


def test_winograd_exports_with_a_symbolic_batch_without_gathers():
  """jax.export (predict's program cache, the export artifact) gives the batch a symbolic
  size: the strided slices of the input transform stay slices there (indexing lowered them
  to gathers, a tenth of the model's time), and the exported program computes what jit does."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 65, 64, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32)
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(conv.conv3x3_winograd))(
      jax.ShapeDtypeStruct((batch, 65, 64, 16), jnp.float32), jax.ShapeDtypeStruct(w.shape, w.dtype))
  assert not re.search(r"stablehlo\.(dynamic_)?gather", exported.mlir_module())
  np.testing.assert_allclose(exported.call(x, w), conv.conv3x3_winograd(x, w), rtol=0, atol=1e-6)


def test_conv3x3_layer_passes_its_formulation():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 64, 64, 16)), jnp.float32)
  layer = layers.Conv3x3(16, impl="winograd")
  p = layer.init(jax.random.key(0), x)
  hlo = jax.jit(layer.apply).lower(p, x).compile().as_text()
  assert "convolution(" not in hlo
  np.testing.assert_allclose(layer.apply(p, x), layers.Conv3x3(16).apply(p, x), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="unknown conv formulation 'fft'; registered: \\['winograd', 'xla'\\]"):
    layers.Conv3x3(16, impl="fft").init(jax.random.key(0), x)
