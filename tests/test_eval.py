"""eval.py, the Evaluator and predict: reports, pictures, one compilation, bad input."""
import csv
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from spadnet_jax import checkpoint, convert, evaluation, sharding, trainer
from spadnet_jax.data import pipeline
from tests.conftest import REPO, fixture_path
from tests.train_helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_faces/tiny", data_dir=data_dir, file_format="array_record").download_and_prepare()
  workdir = str(tmp_path_factory.mktemp("work"))
  trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), workdir)
  return workdir, data_dir


def _eval(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True,
                        text=True, env=env, timeout=600)


@pytest.mark.slow
def test_eval_cli_writes_reports_and_pictures(trained):
  workdir, _ = trained
  r = _eval(f"--workdir={workdir}", "--num_grids=3")
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stderr == ""
  assert "| PSNR (Y) |" in r.stdout and "images/s" in r.stdout and "crop" in r.stdout
  out = os.path.join(workdir, "eval", "2")
  m = json.load(open(os.path.join(out, "metrics.json")))
  for k in ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "nme", "images_per_s"):
    assert np.isfinite(m[k]), k
  assert m["num_images"] == 20 and m["score"] == "float"
  rows = list(csv.DictReader(open(os.path.join(out, "per_image.csv"))))
  assert len(rows) == 20 and len({r["filename"] for r in rows}) == 20
  assert np.mean([float(r["psnr_y"]) for r in rows]) == pytest.approx(m["psnr_y"], abs=1e-3)
  pngs = sorted(os.listdir(os.path.join(out, "sr")))
  assert len(pngs) == 20
  img = np.asarray(Image.open(os.path.join(out, "sr", pngs[0])))
  assert img.shape == (128, 128, 3) and img.dtype == np.uint8
  assert len(os.listdir(os.path.join(out, "grids"))) == 3
  assert Image.open(os.path.join(out, "grids", os.listdir(os.path.join(out, "grids"))[0])).size == (640, 128)


@pytest.mark.slow
def test_png_scoring_flag(trained):
  workdir, _ = trained
  r = _eval(f"--workdir={workdir}", "--score=png", "--save_images=false", "--num_grids=0",
            "--num_images=8")
  assert r.returncode == 0, r.stderr
  m = json.load(open(os.path.join(workdir, "eval", "2", "metrics.json")))
  assert m["score"] == "png" and m["num_images"] == 8 and "8-bit PNG" in m["protocol"]


def test_evaluator_compiles_once_and_masks_padding(trained, monkeypatch):
  workdir, data_dir = trained
  model, variables, _ = checkpoint.load_model(os.path.join(workdir, "checkpoints"))
  mesh = sharding.make_mesh()
  cfg = tiny_config(data_dir)
  make = evaluation.make_eval_step
  # The step may be traced (and so compiled) once: a second trace raises here.
  monkeypatch.setattr(evaluation, "make_eval_step",
                      lambda *a, **k: chex.assert_max_traces(make(*a, **k), n=1))
  ev = evaluation.Evaluator(model, pipeline.Data(cfg.data), "test", mesh, batch_size=8)  # 20 = 8+8+4
  result = ev(variables)
  assert result["summary"]["num_images"] == 20 and len(result["per_image"]["psnr_y"]) == 20
  ev(variables)


@pytest.mark.slow
def test_eval_of_converted_official_checkpoint(trained, tmp_path):
  _, data_dir = trained
  model, variables = convert.from_official(fixture_path("official_x4_small"))
  ckpt = str(tmp_path / "official")
  checkpoint.save_inference_checkpoint(ckpt, model, variables)
  r = _eval(f"--checkpoint={ckpt}", "--config=tests/tiny_config.py",
            f"--config.data.data_dir={data_dir}", "--num_images=8", "--save_images=false")
  assert r.returncode == 0, r.stdout + r.stderr
  m = json.load(open(os.path.join(ckpt, "eval", "0", "metrics.json")))
  assert m["model"]["scale"] == 4 and m["num_images"] == 8


def test_corrupt_checkpoint_is_named(trained, tmp_path):
  workdir, _ = trained
  import shutil
  bad = str(tmp_path / "ckpt")
  shutil.copytree(os.path.join(workdir, "checkpoints"), bad)
  for root, _, files in os.walk(os.path.join(bad, "2", "params")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(checkpoint.DamagedCheckpoint,
                     match=r"checkpoint step 2 is damaged: .*ckpt/2/params/.* has 7 bytes"):
    checkpoint.load_model(bad)
  os.remove(os.path.join(bad, "2", checkpoint.CHECKSUMS))   # unverifiable: Orbax's own check
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"checkpoint step 2 in .*ckpt cannot be restored"):
    checkpoint.load_model(bad, report=lambda msg: None)


@pytest.mark.slow
def test_predict_folder_with_bad_files(trained, tmp_path):
  workdir, _ = trained
  src = tmp_path / "in"
  src.mkdir()
  from spadnet_jax.data import synthetic
  face, _ = synthetic.draw_face(5)
  Image.fromarray(face).resize((16, 16), Image.BICUBIC).save(src / "lr16.png")
  Image.fromarray(face).resize((64, 64), Image.BICUBIC).save(src / "big64.png")
  Image.fromarray(face).resize((20, 16)).save(src / "wide.png")
  (src / "broken.png").write_bytes(b"not a png")
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "spadnet_jax.predict", f"--checkpoint={workdir}/checkpoints",
                      f"--input={src}", f"--output={out}", "--batch_size=4"], cwd=REPO,
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 1
  assert "wide.png: image is 20x16; only square faces" in r.stderr
  assert "broken.png: unreadable image" in r.stderr
  assert "big64.png: reduced from 64x64 to 16x16" in r.stdout
  assert sorted(os.listdir(out)) == ["big64.png", "lr16.png"]
  assert np.asarray(Image.open(out / "lr16.png")).shape == (128, 128, 3)
