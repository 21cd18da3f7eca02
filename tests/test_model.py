"""SPADNet module: shapes, parameter counts, variants and configuration errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from spadnet_jax import models

TINY = dict(n_feats=8, number=2, reduction=4)


def _init(model, size=128, batch=1):
  x = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3)), jnp.float32)
  return model.init(jax.random.key(0), x), x


@pytest.mark.parametrize("scale,stages", [(4, 2), (8, 3), (16, 4)])
def test_output_shapes_per_scale(scale, stages):
  model = models.SPADNet(scale=scale, **TINY)
  variables, x = _init(model, batch=2)
  sr, hm = jax.jit(model.apply)(variables, x)
  assert sr.shape == (2, 128, 128, 3) and hm.shape == (2, 128, 128, 5)
  assert model.num_stages == stages
  names = variables["params"].keys()
  assert {f"stage{s}_sr_up" for s in range(1, stages + 1)} <= set(names)
  assert f"stage{stages + 1}_sr_up" not in names


@pytest.mark.slow
def test_paper_configuration_parameter_count():
  model = models.SPADNet(scale=8)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
  assert models.count_params(shapes) == 7_557_720
  sr, hm = jax.eval_shape(model.apply, shapes, jnp.zeros((4, 128, 128, 3)))
  assert sr.shape == (4, 128, 128, 3) and hm.shape == (4, 128, 128, 5)


def test_hab_num_controls_attention_blocks():
  params, _ = _init(models.SPADNet(scale=4, n_feats=8, number=3, reduction=4, hab_num=1))
  habs = [k for k in params["params"] if "_hab" in k]
  assert sorted(habs) == ["stage1_hab0", "stage2_hab0"]


def test_variants_change_parameters_and_outputs():
  base = models.SPADNet(scale=4, **TINY)
  variables, x = _init(base, size=64)
  sr0, _ = base.apply(variables, x)
  # GSAC gate layout changes outputs, not parameters.
  sr1, _ = models.SPADNet(scale=4, gsac_gate="channel", **TINY).apply(variables, x)
  assert np.abs(np.asarray(sr1 - sr0)).max() > 1e-6
  # PAC implementation changes neither.
  sr2, _ = models.SPADNet(scale=4, pac_impl="shifted", **TINY).apply(variables, x)
  np.testing.assert_allclose(sr2, sr0, atol=1e-5)

  inv = models.SPADNet(scale=4, pac_kernel="inverse", **TINY)
  p_inv, _ = _init(inv, size=64)
  flat = traverse_util.flatten_dict(p_inv["params"])
  assert flat[("stage1_hab0", "lsac", "inv_alpha")].shape == ()
  assert np.isfinite(np.asarray(inv.apply(p_inv, x)[0])).all()

  no_lsac, _ = _init(models.SPADNet(scale=4, use_lsac=False, **TINY), size=64)
  assert "lsac" not in no_lsac["params"]["stage1_hab0"]
  assert no_lsac["params"]["stage1_hab0"]["fuse"]["kernel"].shape == (3, 3, 8, 8)
  no_gsac, _ = _init(models.SPADNet(scale=4, use_gsac=False, **TINY), size=64)
  assert "gsac" not in no_gsac["params"]["stage1_hab0"]


def test_without_heatmap_branch():
  model = models.SPADNet(scale=4, heatmap_branch=False, **TINY)
  variables, x = _init(model, size=64)
  assert not any("_hm" in k or k == "hm_out" for k in variables["params"])
  sr, hm = model.apply(variables, x)
  assert sr.shape == (1, 64, 64, 3) and hm is None


@pytest.mark.parametrize("remat", ["rcab", "all", True])
def test_remat_keeps_gradients(remat):
  model = models.SPADNet(scale=4, **TINY)
  variables, x = _init(model, size=32)
  loss = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x)[0] ** 2)))(variables)
  # True, the boolean form older configurations have, is upgraded where configurations are
  # read (models.from_config).
  g_ref, g_remat = loss(model), loss(models.from_config(dict(scale=4, remat=remat, **TINY)))
  for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


@pytest.mark.slow
def test_remat_saves_memory_on_this_backend():
  """XLA:CPU drops optimization barriers; remat must still keep fewer activations."""
  x = jnp.zeros((2, 64, 64, 3))
  def temp_bytes(remat):
    model = models.SPADNet(scale=4, n_feats=16, number=3, reduction=4, remat=remat)
    variables = model.init(jax.random.key(0), model.example_input())
    grad = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x)[0] ** 2)))
    return grad.lower(variables).compile().memory_analysis().temp_size_in_bytes
  none, rcab, every = temp_bytes("none"), temp_bytes("rcab"), temp_bytes("all")
  assert every < rcab < none, (none, rcab, every)
  assert every < 0.7 * none, (none, every)


def test_bf16_keeps_results():
  model = models.SPADNet(scale=4, **TINY)
  variables, x = _init(model, size=32)
  ref = model.apply(variables, x)[0]
  bf16 = models.SPADNet(scale=4, dtype=jnp.bfloat16, **TINY).apply(variables, x)[0]
  assert bf16.dtype == jnp.float32
  assert np.abs(np.asarray(bf16 - ref)).max() < 0.1


@pytest.mark.parametrize("fields,message", [
    (dict(scale=2), "SPADNet.scale must be one of"),
    (dict(number=2, hab_num=2), r"SPADNet.hab_num must be in \[0, number-1=1\]"),
    (dict(pac_kernel="box"), "SPADNet.pac_kernel must be one of"),
    (dict(pac_impl="cuda"), "SPADNet.pac_impl must be one of"),
    (dict(conv_impl="cudnn"), r"SPADNet.conv_impl must be one of \['winograd', 'xla'\], got 'cudnn'"),
    (dict(gsac_gate="pixel"), "SPADNet.gsac_gate must be"),
    (dict(remat="stage3"), "SPADNet.remat must be one of"),
])
def test_invalid_configuration_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    models.SPADNet(**{**TINY, **fields}).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_rejects_non_rgb_input():
  with pytest.raises(ValueError, match=r"expects \(N, H, W, 3\)"):
    models.SPADNet(scale=4, **TINY).init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
