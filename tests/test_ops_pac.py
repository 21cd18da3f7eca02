"""PAC (LSAC) kernels and convolution against NumPy loops, lax.conv and finite differences."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from spadnet_jax import ops

jax.config.update("jax_enable_x64", False)


def _pad(a):
  return np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _kernel_loop(h, fn):
  n, height, width, _ = h.shape
  hp = _pad(h)
  k = np.zeros((n, height, width, 9))
  for b in range(n):
    for y in range(height):
      for x in range(width):
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            d2 = np.sum((hp[b, y + 1 + dy, x + 1 + dx] - h[b, y, x]) ** 2)
            k[b, y, x, (dy + 1) * 3 + dx + 1] = fn(d2)
  return k


def _pac_loop(x, k, w, b):
  n, height, width, _ = x.shape
  xp = _pad(x)
  out = np.zeros((n, height, width, w.shape[-1]))
  for bb in range(n):
    for y in range(height):
      for xx in range(width):
        acc = b.astype(np.float64).copy()
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            acc += k[bb, y, xx, (dy + 1) * 3 + dx + 1] * (xp[bb, y + 1 + dy, xx + 1 + dx] @ w[dy + 1, dx + 1])
        out[bb, y, xx] = acc
  return out


@pytest.fixture
def data(rng):
  h = rng.standard_normal((2, 5, 6, 4)).astype(np.float32) * 0.5
  x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
  b = rng.standard_normal((2,)).astype(np.float32)
  return h, x, w, b


def test_gaussian_kernel_matches_loop(data):
  h = data[0]
  np.testing.assert_allclose(ops.gaussian_kernel(jnp.asarray(h)), _kernel_loop(h, lambda d: np.exp(-0.5 * d)),
                             rtol=1e-5, atol=1e-6)


def test_inverse_kernel_matches_loop(data):
  h = data[0]
  ref = _kernel_loop(h, lambda d: 0.3 + (d + 1e-4) ** (-0.75))
  np.testing.assert_allclose(ops.inverse_kernel(jnp.asarray(h), alpha=0.3, lam=-1.5), ref, rtol=1e-4)


@pytest.mark.parametrize("impl", sorted(ops.PAC_IMPLS))
def test_pac_conv_matches_loop(data, impl):
  h, x, w, b = data
  k = np.asarray(ops.gaussian_kernel(jnp.asarray(h)))
  out = ops.pac_conv(jnp.asarray(x), jnp.asarray(k), jnp.asarray(w), jnp.asarray(b), impl=impl)
  np.testing.assert_allclose(out, _pac_loop(x, k, w, b), rtol=1e-5, atol=1e-5)


def test_pac_with_unit_kernel_is_plain_convolution(data):
  _, x, w, b = data
  k = jnp.ones(x.shape[:3] + (9,))
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  for impl in ops.PAC_IMPLS:
    np.testing.assert_allclose(ops.pac_conv(x, k, w, b, impl=impl), ref, rtol=1e-5, atol=1e-5)


def test_pac_impls_agree_at_model_width(rng):
  x = jnp.asarray(rng.standard_normal((1, 16, 16, 64)).astype(np.float32))
  h = jnp.asarray(rng.standard_normal((1, 16, 16, 64)).astype(np.float32) * 0.1)
  w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)).astype(np.float32) * 0.05)
  k = ops.gaussian_kernel(h)
  np.testing.assert_allclose(ops.pac_conv_shifted(x, k, w), ops.pac_conv_einsum(x, k, w), atol=2e-5)


def test_pac_conv_rejects_unknown_impl(data):
  _, x, w, b = data
  with pytest.raises(ValueError, match="unknown PAC formulation 'pallas'"):
    ops.pac_conv(x, jnp.ones(x.shape[:3] + (9,)), w, b, impl="pallas")


@pytest.mark.parametrize("impl", sorted(ops.PAC_IMPLS))
def test_pac_gradients(data, impl):
  h, x, w, b = (jnp.asarray(a, jnp.float32) for a in data)
  sl = (slice(None, 1), slice(0, 3), slice(0, 3))
  h, x = h[sl], x[sl]
  f = lambda x, h, w, b: ops.pac_conv(x, ops.gaussian_kernel(h), w, b, impl=impl)
  check_grads(f, (x, h, w, b), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)


def test_inverse_kernel_gradients(data):
  h = jnp.asarray(data[0][:1, :3, :3])
  f = lambda h, a, lam: ops.inverse_kernel(h, alpha=a, lam=lam, eps=0.5)
  check_grads(f, (h, jnp.float32(0.2), jnp.float32(-1.0)), order=1, modes=("rev",),
              atol=5e-2, rtol=5e-2, eps=1e-2)


def test_custom_gradients_match_autodiff_of_the_reference(data):
  h, x, w, b = (jnp.asarray(a) for a in data)
  ref_kernel = lambda h: jnp.exp(-0.5 * ops.squared_distances(h))
  f_ref = lambda x, h, w, b: jnp.sum(jnp.sin(ops.pac_conv_einsum(x, ref_kernel(h), w, b)))
  f_new = lambda x, h, w, b: jnp.sum(jnp.sin(ops.pac_conv_fused(x, ops.gaussian_kernel(h), w, b)))
  for a, r in zip(jax.grad(f_new, argnums=(0, 1, 2, 3))(x, h, w, b),
                  jax.grad(f_ref, argnums=(0, 1, 2, 3))(x, h, w, b)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))
  g_nobias = jax.grad(lambda x: jnp.sum(ops.pac_conv_fused(x, ref_kernel(h), w) ** 2))(x)
  assert g_nobias.shape == x.shape


def test_fused_bfloat16_accumulates_in_float32(data):
  """bf16 inputs: the tap sum is accumulated in float32, and gradients keep input dtypes."""
  h, x, w, b = (jnp.asarray(a, jnp.float32) for a in data)
  k = ops.gaussian_kernel(h)
  ref = ops.pac_conv_einsum(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, k, w, b)))
  out = ops.pac_conv_fused(*(a.astype(jnp.bfloat16) for a in (x, k, w, b)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2 * float(jnp.abs(ref).max()))
  grads = jax.grad(lambda *a: jnp.sum(ops.pac_conv_fused(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3))(
      *(a.astype(jnp.bfloat16) for a in (x, k, w, b)))
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  assert ops.gaussian_kernel(h.astype(jnp.bfloat16)).dtype == jnp.float32


def test_unrolled_tap_path_of_accelerators_matches(data, monkeypatch):
  """GPUs/TPUs run other paths (unrolled taps, the einsum's backward, 'auto' = einsum on GPUs
  and shifted on TPUs): check them."""
  from spadnet_jax.ops import pac_formulations, windows
  h, x, w, b = (jnp.asarray(a, jnp.float32) for a in data)
  loss = lambda impl: (lambda x, h, w, b: jnp.sum(jnp.sin(ops.pac_conv(x, ops.gaussian_kernel(h), w, b,
                                                                       impl=impl))))
  ref = jax.grad(loss("fused"), argnums=(0, 1, 2, 3))(x, h, w, b)
  for module in (pac_formulations, windows):
    monkeypatch.setattr(module, "by_platform", lambda cpu, default, *args, **_: default(*args))
  for impl in ("fused", "auto"):
    got = jax.grad(loss(impl), argnums=(0, 1, 2, 3))(x, h, w, b)
    for a, r in zip(got, ref):
      np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))
  # As on a TPU: 'auto' is 'shifted' there.
  chosen = []
  shifted = pac_formulations.pac_conv_shifted
  monkeypatch.setattr(pac_formulations, "pac_conv_shifted",
                      lambda *a: chosen.append("shifted") or shifted(*a))
  for module in (pac_formulations, windows):
    monkeypatch.setattr(module, "by_platform",
                        lambda cpu, default, *args, tpu=None: (tpu or default)(*args))
  got = jax.grad(loss("auto"), argnums=(0, 1, 2, 3))(x, h, w, b)
  assert chosen == ["shifted"]
  for a, r in zip(got, ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))
  np.testing.assert_allclose(ops.gaussian_kernel(h), _kernel_loop(np.asarray(h), lambda d: np.exp(-0.5 * d)),
                             rtol=1e-5, atol=1e-6)
  # No bias, bfloat16: the accelerators' backward keeps the inputs' dtypes and shapes.
  k = ops.gaussian_kernel(h)
  grads = jax.grad(lambda *a: jnp.sum(ops.pac_conv_fused(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(
      *(a.astype(jnp.bfloat16) for a in (x, k, w)))
  assert [(g.shape, g.dtype) for g in grads] == [(a.shape, jnp.bfloat16) for a in (x, k, w)]
  ref = jax.grad(lambda *a: jnp.sum(ops.pac_conv_einsum(*a) ** 2), argnums=(0, 1, 2))(x, k, w)
  for a, r in zip(grads, ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), r, rtol=5e-2, atol=3e-2 * float(jnp.abs(r).max()))


def test_squared_distances_5x5_window_matches_loop(rng):
  """The mirror-pair formulation holds for any odd window, borders included."""
  h = rng.standard_normal((1, 4, 6, 3)).astype(np.float32)
  hp = np.pad(h, ((0, 0), (2, 2), (2, 2), (0, 0)))
  ref = np.zeros((1, 4, 6, 25), np.float32)
  for y in range(4):
    for x in range(6):
      for t in range(25):
        dy, dx = divmod(t, 5)
        ref[0, y, x, t] = np.sum((hp[0, y + dy, x + dx] - h[0, y, x]) ** 2)
  np.testing.assert_allclose(ops.squared_distances(jnp.asarray(h), 5), ref, rtol=1e-6, atol=1e-6)
  check_grads(lambda h: ops.gaussian_kernel(h * 0.3, 5), (jnp.asarray(h[:, :3, :4]),), order=1,
              modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("rows", [1, 2, 3, 6])
def test_banded_backward_matches_the_reference_for_any_band(rng, rows):
  """The CPU backward pass (all gradients band of rows by band) equals the einsum's autodiff."""
  from spadnet_jax.ops import pac_formulations
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)).astype(np.float32))
  k = jnp.asarray(rng.uniform(size=(2, 6, 5, 9)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal((4,)).astype(np.float32))
  g = jnp.asarray(rng.standard_normal((2, 6, 5, 4)).astype(np.float32))
  got = pac_formulations._fused_bwd_banded((x, k, w, b), g, rows)
  ref = jax.vjp(ops.pac_conv_einsum, x, k, w, b)[1](g)
  for a, r in zip(got, ref):
    assert a.shape == r.shape
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))


def test_band_rows_make_bands_of_about_1024_pixels():
  from spadnet_jax.ops import pac_formulations
  # (image height, pixels per row of the whole batch): batch 8 at 64x64, 128x128, 16x16...
  assert [pac_formulations.band_rows(h, p) for h, p in [(64, 512), (128, 1024), (16, 128), (5, 6), (7, 5000)]] == [
      2, 1, 8, 5, 1]


_SHARDED_PAC = """
import re, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from spadnet_jax import ops
mesh = Mesh(np.array(jax.devices()), ("data",))
batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
r = np.random.default_rng(0)
x, h = (r.standard_normal((8, 8, 6, 4)).astype(np.float32) for _ in range(2))
w, b = r.standard_normal((3, 3, 4, 3)).astype(np.float32), np.zeros(3, np.float32)
def grads(impl):
  loss = lambda x, h, w: jnp.sum(jnp.sin(ops.pac_conv(x, ops.gaussian_kernel(h), w, b, impl=impl)))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
args = (jax.device_put(x, batch), jax.device_put(h, batch), jax.device_put(w, rep))
hlo = grads("fused").lower(*args).compile().as_text()
print("all-gathers", len(re.findall(r"all-gather[(]", hlo)))
for a, e in zip(grads("fused")(*args), grads("einsum")(x, h, w)):
  np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))
print("ok")
"""


@pytest.mark.slow
def test_fused_gradient_keeps_a_batch_sharded_over_devices_in_place():
  """8 simulated CPU devices, batch-sharded: right gradients, and no device gathers the batch."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", _SHARDED_PAC], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "all-gathers 0" in out.stdout and "ok" in out.stdout, out.stdout


def test_after_keeps_values_and_fused_backward_keeps_no_forward_temporaries():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(ops.after(x, jnp.ones(4)), x)
  assert np.isnan(np.asarray(ops.after(x, jnp.full(4, jnp.nan)))).all()   # CPU: NaN cotangent
  shape = (8, 64, 64, 16)   # the CPU backward pass unfolds bands of 1024 pixels: 1/32 of this
  args = (jnp.ones(shape), jnp.ones(shape), jnp.ones((3, 3, 16, 16)), jnp.zeros((16,)))

  def temp_bytes(impl):
    loss = lambda x, h, w, b: jnp.sum(ops.pac_conv(x, ops.gaussian_kernel(h), w, b, impl=impl) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  # Measured on XLA:CPU (jax 0.10.2): fused 0.16x the einsum reference's temporaries
  # (0.12x at 8x64x64x64) with the banded backward pass; 0.21x with the per-tap loop
  # before it, 0.29x when that loop reused forward copies (ops.after as the identity).
  fused, reference = temp_bytes("fused"), temp_bytes("einsum")
  assert fused < 0.19 * reference, (fused, reference)
  # 'auto' is 'fused' here: differentiating through its platform switch adds no einsum temporaries.
  assert temp_bytes("auto") <= 1.02 * fused


def test_gaussian_kernel_gradient_of_bfloat16_guidance(data):
  """bf16 guidance: the one-pass gradient accumulates in float32 and returns bf16 close to it."""
  h = jnp.asarray(data[0])
  ct = jnp.asarray(np.random.default_rng(3).standard_normal(h.shape[:3] + (9,)), jnp.float32)
  grad = lambda h: jax.grad(lambda h: jnp.sum(ops.gaussian_kernel(h) * ct))(h)
  got, ref = grad(h.astype(jnp.bfloat16)), grad(h.astype(jnp.bfloat16).astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2,
                             atol=1e-2 * float(jnp.abs(ref).max()))
