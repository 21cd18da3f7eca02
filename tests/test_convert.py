"""Official state dict <-> Flax conversion, the Orbax checkpoint it writes, and its CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import checkpoint, convert, models
from tests.conftest import REPO, fixture_path


@pytest.fixture(scope="module")
def official():
  path = fixture_path("official_x4_small")
  sd = convert.load_state_dict(path)
  return path, sd, np.load(path)["input"].transpose(0, 2, 3, 1)[:1]


def test_infers_configuration_from_keys(official):
  _, sd, _ = official
  assert convert.infer_model_fields(sd) == dict(
      scale=4, n_feats=64, number=2, hab_num=1, reduction=16, pac_kernel="gaussian", use_lsac=True,
      use_gsac=True, heatmap_branch=True)


def test_round_trip_reproduces_state_dict(official):
  _, sd, _ = official
  model, variables = convert.from_official(sd)
  back = convert.to_official(model, variables)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_variant_round_trip_without_heatmap_branch():
  model = models.SPADNet(scale=4, n_feats=8, number=2, reduction=4, heatmap_branch=False,
                         pac_kernel="inverse")
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  sd = convert.to_official(model, variables)
  assert "hab_branch2.0.pacconv1.inv_alpha" in sd and "Heatmap_out.weight" not in sd
  model2, variables2 = convert.from_official(sd)
  assert (model2.heatmap_branch, model2.pac_kernel, model2.n_feats) == (False, "inverse", 8)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables2)


def test_missing_misshaped_and_unexpected_keys_are_all_named_at_once(official, capsys):
  _, sd, _ = official
  sd = {**sd, "extra.weight": np.zeros(3), "SR_branch2.1.body.2.weight": np.zeros((64, 32, 3, 3)),
        "SR_branch2.1.body.3.conv_du.0.weight": np.zeros((4, 64))}
  del sd["hab_branch3.0.pacconv1.weight"], sd["hab_branch3.0.pacconv1.bias"]
  with pytest.raises(ValueError) as e:
    convert.from_official(sd)
  msg = str(e.value)
  assert "2 missing keys: ['hab_branch3.0.pacconv1.bias', 'hab_branch3.0.pacconv1.weight']" in msg
  # Shapes in the official (torch) layout the user has: OIHW, 1x1 convs as (O, I, 1, 1).
  assert ("2 mis-shaped keys: ['SR_branch2.1.body.3.conv_du.0.weight has shape (4, 64), the model "
          "needs (4, 64, 1, 1)', 'SR_branch2.1.body.2.weight has shape (64, 32, 3, 3), the "
          "model needs (64, 64, 3, 3)']") in msg
  assert "1 keys this model does not use: ['extra.weight']" in msg
  sd = {**official[1], "extra.weight": np.zeros(3)}
  convert.from_official(sd, strict=False)
  assert "extra.weight" in capsys.readouterr().err


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
    lambda sd: {f"state_dict/{k}": v for k, v in sd.items()},
])
def test_wrappers_official_and_derived_checkpoints_come_in(official, wrap):
  _, sd, _ = official
  _, variables = convert.from_official(wrap(dict(sd)))
  np.testing.assert_array_equal(convert.to_official(convert.from_official(sd)[0], variables)["head.1.weight"],
                                sd["head.1.weight"])


def test_something_else_names_the_keys_it_found(official):
  with pytest.raises(ValueError, match=r"holds no SPADNet state dict \(no 'head.1.weight'\); "
                     r"top-level keys: \['epoch', 'weights'\]"):
    convert.from_official({"epoch": 1, "weights": {"conv.weight": np.zeros(3)}})


def test_contradicting_field_is_an_error(official):
  _, sd, _ = official
  with pytest.raises(ValueError, match="scale=8 was requested but the state dict is for scale=4"):
    convert.from_official(sd, scale=8)


def test_orbax_checkpoint_round_trip(official, tmp_path):
  _, sd, x = official
  model, variables = convert.from_official(sd, gsac_gate="official")
  checkpoint.save_inference_checkpoint(str(tmp_path / "ckpt"), model, variables)
  loaded, restored, step = checkpoint.load_model(str(tmp_path / "ckpt"))
  assert step == 0 and loaded == model
  np.testing.assert_array_equal(loaded.apply(restored, x)[0], model.apply(variables, x)[0])
  with pytest.raises(FileExistsError, match="already holds a checkpoint at step 0"):
    checkpoint.save_inference_checkpoint(str(tmp_path / "ckpt"), model, variables)


def test_checkpoint_of_other_configuration_names_parameter(official, tmp_path):
  _, sd, _ = official
  model, variables = convert.from_official(sd)
  path = str(tmp_path / "ckpt")
  checkpoint.save_inference_checkpoint(path, model, variables)
  with pytest.raises(ValueError, match=r"\['head'\]\['bias'\] has shape \(64,\), the "
                     r"model configuration needs \(32,\)"):
    checkpoint.load_model(path, n_feats=32)


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "spadnet_jax.convert", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_npz_to_orbax_and_back(official, tmp_path):
  path, sd, _ = official
  out = tmp_path / "converted"
  r = _cli(str(path), str(out))
  assert r.returncode == 0, r.stderr
  r = _cli("--to_official", str(out), str(tmp_path / "back.npz"))
  assert r.returncode == 0, r.stderr
  back = np.load(tmp_path / "back.npz")
  assert set(back.files) == set(sd)
  np.testing.assert_array_equal(back["head.1.weight"], sd["head.1.weight"])
  r = _cli("--to_official", str(out), str(tmp_path / "back.npz"))
  assert r.returncode == 1 and r.stderr.strip() == (f"error: output {tmp_path / 'back.npz'} already "
                                                    "exists; choose a new path (nothing is overwritten)")
  r = _cli(str(path), str(out))                             # an existing checkpoint folder
  assert r.returncode == 1 and r.stderr.startswith(f"error: output {out} already exists"), r.stderr
  png = tmp_path / "face.png"
  png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
  r = _cli(str(png), str(tmp_path / "from_png"))
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith(f"error: {png} cannot be read as a PyTorch checkpoint"), r.stderr
  assert "weights_only" not in r.stderr


def test_pth_needs_torch_or_reads_it(official, tmp_path):
  _, sd, _ = official
  torch = pytest.importorskip("torch", reason="torch is an optional extra for .pth files")
  pth = tmp_path / "official.pth"
  torch.save({f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}, pth)
  model, variables = convert.from_official(str(pth))
  back = convert.to_official(model, variables)
  np.testing.assert_array_equal(back["SR_out.weight"], sd["SR_out.weight"])


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.pth does not exist"):
    convert.from_official(str(tmp_path / "nothing.pth"))
