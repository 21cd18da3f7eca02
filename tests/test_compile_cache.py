"""The persistent compilation cache: where it lives, and predict compiling once across
processes (two at once sharing an empty cache included), a repeated call importing neither
Flax, Orbax nor TensorFlow."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from spadnet_jax import checkpoint, compile_cache, models
from spadnet_jax.data import synthetic
from tests.conftest import REPO


def test_the_cache_folder_is_per_user_movable_and_the_users_own_setting_wins():
  env = {"HOME": "/home/u"}
  compile_cache.configure(env)
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/home/u/.cache/spadnet_jax/xla"
  assert int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]) == compile_cache.MAX_BYTES   # locks on
  env = {"HOME": "/home/u", "XDG_CACHE_HOME": "/xdg"}
  compile_cache.configure(env)
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/xdg/spadnet_jax/xla"
  env = {"HOME": "/home/u", compile_cache.ENV: "/shared/cache"}
  compile_cache.configure(env)
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/shared/cache/xla"
  assert compile_cache.cache_root(env) == "/shared/cache"
  env = {compile_cache.ENV: "/a", "JAX_COMPILATION_CACHE_DIR": "/mine"}
  compile_cache.configure(env)      # the user's own cache as they set it (no size cap added)
  assert env == {compile_cache.ENV: "/a", "JAX_COMPILATION_CACHE_DIR": "/mine"}
  compile_cache.configure(env, root="/flag")    # but a --cache_dir on the command line moves it
  assert env[compile_cache.ENV] == "/flag" and env["JAX_COMPILATION_CACHE_DIR"] == "/flag/xla"


@pytest.mark.slow
def test_predict_compiles_once_says_so_and_two_processes_share_the_cache(tmp_path):
  model = models.SPADNet(scale=8, n_feats=4, number=2, reduction=2, pac_impl="fused")
  ckpt = tmp_path / "ckpt"
  checkpoint.save_inference_checkpoint(str(ckpt), model,
                                       model.init(jax.random.key(0), model.example_input()))
  src = tmp_path / "in"
  src.mkdir()
  for i in range(3):
    Image.fromarray(synthetic.draw_face(i)[0]).resize((16, 16), Image.BICUBIC).save(src / f"{i}.png")
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_PLATFORMS="cpu", SPADNET_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")   # the tiny model compiles fast

  def start(out, *python_options):
    return subprocess.Popen([sys.executable, *python_options, "-m", "spadnet_jax.predict", f"--checkpoint={ckpt}",
                             f"--input={src}", f"--output={out}", "--batch_size=4"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  first = [start(tmp_path / "out_a"), start(tmp_path / "out_b")]      # an empty cache, shared
  results = [p.communicate(timeout=300) for p in first]
  for p, (out, err) in zip(first, results):
    assert p.returncode == 0 and err == "", err
    assert f"compiled the model for batches of 3 in " in out, out      # 3 inputs: one batch of 3
  assert any(n.endswith("-cache") for n in os.listdir(cache / "xla"))
  assert len(os.listdir(cache / "programs")) == 1                        # one entry, whoever won
  again = start(tmp_path / "out_c", "-X", "importtime")
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err
  assert "compiled the model" not in out, out                            # loaded, not compiled
  imported = {line.split("|")[-1].strip().split(".")[0] for line in err.splitlines()
              if line.startswith("import time:")}
  assert "jax" in imported
  assert not imported & {"flax", "orbax", "tensorflow", "tensorflow_datasets", "optax", "grain"}
  for name in os.listdir(tmp_path / "out_a"):
    a, b, c = (np.asarray(Image.open(tmp_path / d / name)) for d in ("out_a", "out_b", "out_c"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
