"""Faults a long run meets: damaged checkpoints, a second run, a full disk, bad outputs.

Real bytes are changed in real checkpoint files, a real second train.py is started, and
a real full disk is made (a small tmpfs where this runs as root; else skipped)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from spadnet_jax import checkpoint, trainer
from spadnet_jax.storage import locks
from tests.conftest import REPO
from tests.train_helpers import run_train, tiny_config, wait_for_line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_faces/tiny", data_dir=d, file_format="array_record").download_and_prepare()
  return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A finished tiny run with checkpoint steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("work"))
  trainer.train_and_evaluate(tiny_config(data_dir), workdir)
  assert checkpoint.steps(os.path.join(workdir, "checkpoints")) == [4, 2]
  return workdir


def _copy(trained, tmp_path):
  work = str(tmp_path / "work")
  shutil.copytree(trained, work)
  return work, os.path.join(work, "checkpoints")


def _largest_param_file(ckpts, step):
  found = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpts, str(step), "params"))
           for f in fs]
  return max(found, key=os.path.getsize)


def _flip(path, offset=None, count=4):
  data = bytearray(open(path, "rb").read())
  at = len(data) // 2 if offset is None else offset
  for i in range(at, at + count):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _eval(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True,
                        text=True, env=env, timeout=600)


def test_every_step_is_sealed_and_verifies(trained):
  ckpts = os.path.join(trained, "checkpoints")
  for step in (2, 4):
    assert checkpoint.verify(ckpts, step)
    manifest = json.load(open(os.path.join(ckpts, str(step), checkpoint.CHECKSUMS)))
    assert any(name.startswith("params/") for name in manifest["files"])


@pytest.mark.parametrize("damage,expected", [
    ("flip", r"does not match its checksum"),
    ("truncate", r"has \d+ bytes, \d+ were written"),
    ("delete", r"is missing"),
])
def test_damaged_newest_step_falls_back_and_explicit_step_fails(trained, tmp_path, damage, expected):
  _, ckpts = _copy(trained, tmp_path)
  path = _largest_param_file(ckpts, 4)
  if damage == "flip":
    _flip(path)
  elif damage == "truncate":
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
  else:
    os.remove(path)
  reports = []
  _, variables, step = checkpoint.load_model(ckpts, report=reports.append)
  assert step == 2
  assert len(reports) == 1 and "checkpoint step 4 is damaged" in reports[0]
  assert os.path.relpath(path, ckpts) in reports[0]
  assert np.isfinite(np.asarray(variables["params"]["head"]["kernel"])).all()
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"checkpoint step 4 is damaged: .*" + expected):
    checkpoint.load_model(ckpts, step=4)


@pytest.mark.slow
def test_eval_falls_back_from_a_damaged_step_and_refuses_it_by_name(trained, tmp_path):
  work, ckpts = _copy(trained, tmp_path)
  _flip(_largest_param_file(ckpts, 4))
  r = _eval(f"--workdir={work}", "--num_images=8", "--save_images=false", "--num_grids=0")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "checkpoint step 4 is damaged" in r.stdout and "trying the previous step" in r.stdout
  assert json.load(open(os.path.join(work, "eval", "2", "metrics.json")))["step"] == 2
  r = _eval(f"--workdir={work}", "--step=4", "--num_images=8")
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("error: checkpoint step 4 is damaged: ")
  assert "Traceback" not in r.stderr


def test_resume_falls_back_and_sets_the_damaged_step_aside(trained, tmp_path, data_dir, capsys):
  work, ckpts = _copy(trained, tmp_path)
  _flip(_largest_param_file(ckpts, 4))
  summary = trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=6), work)
  out = capsys.readouterr().out
  assert "checkpoint step 4 is damaged" in out and "resumed from step 2" in out
  assert summary["step"] == 6
  assert os.path.isdir(os.path.join(work, "checkpoints.set_aside", "4"))   # kept, not deleted
  assert checkpoint.steps(ckpts) == [6, 4, 2][:len(checkpoint.steps(ckpts))]
  assert checkpoint.verify(ckpts, 6)


def test_non_finite_parameters_are_never_loaded(trained, tmp_path, data_dir):
  _, ckpts = _copy(trained, tmp_path)
  model, variables, _ = checkpoint.load_model(ckpts, step=2)
  bad = jax.tree_util.tree_map(lambda a: np.full_like(np.asarray(a), np.nan), variables)
  checkpoint.save_inference_checkpoint(str(tmp_path / "nan"), model, bad)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"holds non-finite values"):
    checkpoint.load_model(str(tmp_path / "nan"))


@pytest.mark.slow
def test_eval_exits_non_zero_on_non_finite_metrics(trained, tmp_path, data_dir):
  model, variables, _ = checkpoint.load_model(os.path.join(trained, "checkpoints"))
  huge = jax.tree_util.tree_map(lambda a: np.asarray(a) * 1e30, variables)   # finite weights
  ckpt = str(tmp_path / "huge")
  checkpoint.save_inference_checkpoint(ckpt, model, huge)
  r = _eval(f"--checkpoint={ckpt}", "--config=tests/tiny_config.py",
            f"--config.data.data_dir={data_dir}", "--num_images=8", "--save_images=false",
            "--num_grids=0")
  assert r.returncode == 1, r.stdout + r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: checkpoint step 0 of ")
  assert "non-finite psnr_y" in r.stderr


@pytest.mark.slow
def test_a_second_run_in_a_workdir_in_use_is_refused_and_a_killed_one_does_not_block(
    tmp_path, data_dir):
  work = str(tmp_path / "work")
  first = run_train(work, data_dir, "--config.num_train_steps=100000",
                    "--config.checkpoint_every=100000", popen=True)
  try:
    wait_for_line(first, "step 1/")
    second = run_train(work, data_dir, "--config.num_train_steps=2")
    assert second.returncode == 1, second.stdout + second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: workdir {work} is in use by another run (host ")
    assert f"pid {first.pid}" in last
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  with locks.workdir_lock(work):          # the dead run's lock is gone with its process
    pass
  with locks.workdir_lock(work), pytest.raises(locks.WorkdirInUse, match=f"pid {os.getpid()}"):
    with locks.workdir_lock(work):
      pass


@pytest.fixture
def small_disk(tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                     capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): needs root")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_message_and_the_rerun_resumes(trained, small_disk, data_dir):
  work = str(small_disk / "work")
  shutil.copytree(trained, work)
  shutil.rmtree(os.path.join(work, "checkpoints", "4"))
  for name in os.listdir(work):
    if name.startswith("events.out"):
      os.remove(os.path.join(work, name))
  st = os.statvfs(small_disk)
  filler = small_disk / "filler"
  with open(filler, "wb") as f:          # leave 64 KiB: config.json fits, a checkpoint does not
    f.write(b"\0" * max(st.f_bavail * st.f_frsize - 64 * 1024, 0))
  r = run_train(work, data_dir, "--config.num_train_steps=4")
  assert r.returncode == 1, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()
  assert err[-1].startswith("error: no space left on device writing checkpoint step 4 in "
                            f"{work}/checkpoints; earlier checkpoints are intact"), r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "sys.meta_path is None" not in r.stderr
  assert checkpoint.verify(os.path.join(work, "checkpoints"), 2)
  # That run's TensorBoard events filled the disk: the next one cannot create its own.
  r = run_train(work, data_dir, "--config.num_train_steps=4")
  assert r.returncode == 1, r.stdout + r.stderr
  assert r.stderr.strip().splitlines()[-1] == ("error: no space left on device creating the "
                                               f"TensorBoard events file in {work}; free space "
                                               "and rerun the same command"), r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  for name in os.listdir(work):
    if name.startswith("events.out"):
      os.remove(os.path.join(work, name))
  # The same disk with the free-space pre-check fooled (shutil.disk_usage reports 1 TiB):
  # the disk fills during Orbax's write, with TensorStore writes in flight.
  fooled = small_disk.parent / "fooled"
  fooled.mkdir()
  (fooled / "sitecustomize.py").write_text(
      "import shutil\n_usage = shutil.disk_usage\n"
      "shutil.disk_usage = lambda path: _usage(path)._replace(free=1 << 40)\n")
  r = run_train(work, data_dir, "--config.num_train_steps=4", env={"PYTHONPATH": str(fooled)})
  assert r.returncode == 1, r.stdout + r.stderr
  assert r.stderr.strip().startswith("error: no space left on device writing checkpoint step 4 "), \
      r.stderr[-3000:]
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
  assert checkpoint.steps(os.path.join(work, "checkpoints")) == [2]
  assert checkpoint.verify(os.path.join(work, "checkpoints"), 2)
  filler.unlink()
  r = run_train(work, data_dir, "--config.num_train_steps=4")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "resumed from step 2" in r.stdout
  assert checkpoint.steps(os.path.join(work, "checkpoints"))[0] == 4


def _predict(checkpoint_path, src, out):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "spadnet_jax.predict", f"--checkpoint={checkpoint_path}",
                         f"--input={src}", f"--output={out}"], cwd=REPO, capture_output=True,
                        text=True, env=env, timeout=600)


@pytest.mark.slow
def test_predict_refuses_empty_input_and_a_file_as_output_and_never_overwrites(trained, tmp_path):
  ckpts = os.path.join(trained, "checkpoints")
  empty = tmp_path / "empty"
  empty.mkdir()
  r = _predict(ckpts, empty, tmp_path / "out0")
  assert r.returncode == 1 and r.stderr.strip() == f"error: input folder {empty} holds no images " \
      "(.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff)"
  src = tmp_path / "in"
  src.mkdir()
  from spadnet_jax.data import synthetic
  for seed, name in ((1, "face.jpg"), (2, "face.png")):
    Image.fromarray(synthetic.draw_face(seed)[0]).resize((16, 16), Image.BICUBIC).save(src / name)
  target = tmp_path / "file.png"
  target.write_bytes(b"mine")
  r = _predict(str(tmp_path / "no_such_checkpoint"), src, target)   # fails before the model
  assert r.returncode == 1 and r.stderr.strip() == (f"error: --output {target} is a file; give a "
                                                    "folder for the SR images")
  assert target.read_bytes() == b"mine"
  r = _predict(ckpts, src, tmp_path / "out")
  assert r.returncode == 0 and r.stderr == "", r.stderr
  outs = sorted(os.listdir(tmp_path / "out"))
  assert outs == ["face.jpg.png", "face.png.png"]
  a, b = (np.asarray(Image.open(tmp_path / "out" / n)) for n in outs)
  assert not np.array_equal(a, b)
