"""Converted official weights reproduce the official PyTorch outputs (float32 round-off)."""
import jax
import numpy as np
import pytest

from spadnet_jax import convert, ops
from spadnet_jax.models import batching
from tests.conftest import fixture_path


def _check(name, stepped=False, **fields):
  """The converted fixture's outputs against the official ones: model.apply on the batch,
  or `stepped` as our inference paths run it (models.batching: one image per step here)."""
  path = fixture_path(name)
  data = np.load(path)
  model, variables = convert.from_official(path, **fields)
  apply = batching.in_steps(model.apply, per_step=batching.images_per_step(model)) if stepped else model.apply
  sr, hm = jax.jit(apply)(variables, data["input"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(sr).transpose(0, 3, 1, 2), data["sr"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(hm).transpose(0, 3, 1, 2), data["heatmap"], atol=1e-4, rtol=0)
  return model


@pytest.mark.parametrize("name,scale", [("official_x4_small", 4), ("official_x8_small", 8),
                                        ("official_x16_small", 16)])
def test_small_fixtures(name, scale):
  model = _check(name)
  assert (model.scale, model.number, model.num_habs) == (scale, 2, 1)


@pytest.mark.parametrize("impl", sorted(ops.PAC_IMPLS))
def test_every_pac_formulation_keeps_parity(impl):
  assert _check("official_x8_small", pac_impl=impl).pac_impl == impl


@pytest.mark.parametrize("impl", sorted(ops.CONV_IMPLS))
def test_every_conv_formulation_keeps_parity(impl):
  """The small x8 fixture's last stage runs at 64x64, where 'winograd' takes F(2x2, 3x3)
  on a CPU for one image per call (tests/test_ops_conv.py checks that it does)."""
  assert _check("official_x8_small", stepped=True, conv_impl=impl).conv_impl == impl


@pytest.mark.slow
def test_paper_size_x8():
  model = _check("official_x8")
  assert (model.scale, model.n_feats, model.number, model.num_habs) == (8, 64, 6, 5)
