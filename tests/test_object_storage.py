"""Runs whose workdir, checkpoints and data live in a bucket (gs://), against a real GCS
JSON-API server on 127.0.0.1 (tests/gcs_server.py): nothing reaches the network."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from spadnet_jax import checkpoint, models, trainer
from spadnet_jax.storage import checksums, locks, paths
from tests.conftest import REPO
from tests.gcs_server import BUCKET, gcs  # noqa: F401  (the server fixture)
from tests.train_helpers import tiny_config

ROOT = f"gs://{BUCKET}"


def _fs():
  return paths.filesystem(ROOT)[0]


def _objects(url: str) -> dict[str, int]:
  return paths.list_files(url)


def _program(script: str, *args: str, cwd: str, cache: str, env=None, popen: bool = False):
  """A program of the repository started from `cwd` with its own local cache folder: the
  process shares nothing with the others but the bucket. Of the client settings it gets
  STORAGE_EMULATOR_HOST alone: the program derives the rest."""
  derived = paths.client_environment({paths.EMULATOR: "host"})
  full_env = {**{k: v for k, v in os.environ.items() if k not in derived},
              "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
              "SPADNET_CACHE_DIR": cache, **(env or {})}
  program = [str(REPO / script)] if script.endswith(".py") else ["-m", script]
  cmd = [sys.executable, *program, *args]
  if popen:
    return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def _train_args(workdir: str, data_dir: str, *flags: str) -> list[str]:
  return ["--config", str(REPO / "tests" / "tiny_config.py"), f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *flags]


# --- paths -----------------------------------------------------------------------------------

def test_urls_are_checked_in_one_line_and_local_paths_stay_plain(tmp_path):
  assert os.fspath(paths.resolve("rel/x", "--workdir")) == os.path.abspath("rel/x")
  assert os.fspath(paths.resolve("gs://b/run/", "--workdir")) == "gs://b/run"
  with pytest.raises(paths.StorageError, match=r"^--workdir=memory://x: unsupported URL scheme "
                     r"memory:// \(supported: gs://, s3://, or a local path\)$"):
    paths.resolve("memory://x", "--workdir")
  if paths.importlib.util.find_spec("s3fs") is None:
    with pytest.raises(paths.StorageError, match=r"^config.data.data_dir=s3://b/d: s3:// needs the "
                       r"s3fs package; install it with `pip install -e .\[s3\]`"):
      paths.resolve("s3://b/d", "config.data.data_dir")


def test_the_emulator_host_alone_routes_every_client():
  env = paths.client_environment({"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"})
  assert env == {"EPATH_USE_TF": "false", "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:4443",
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                 "FSSPEC_GCS": '{"use_listings_cache": false, "token": "anon"}'}
  # What the user set is kept; without an emulator, etils goes to fsspec, gcsfs uncached.
  assert paths.client_environment({"EPATH_USE_TF": "true"}) == {
      "FSSPEC_GCS": '{"use_listings_cache": false}'}
  # fsspec reads that variable itself (as JSON) when it is imported.
  r = subprocess.run([sys.executable, "-c", "import fsspec.config as c; print(c.conf['gcs'])"],
                     env={**os.environ, **env}, capture_output=True, text=True, check=True)
  assert r.stdout.strip() == "{'use_listings_cache': False, 'token': 'anon'}"


def test_urls_go_through_fsspec_even_after_local_paths_were_used():
  # etils caches its backend choice on the first path of any kind (Orbax makes many before
  # a URL is seen in a long-lived process); configure_clients makes it choose again.
  code = ("import os; from etils import epath; epath.Path('/tmp').exists(); "
          "from spadnet_jax.storage import paths; paths.configure_clients(); "
          "print(type(epath.Path('gs://b/x')._backend).__name__)")
  env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     check=True)
  assert r.stdout.strip() == "_FileSystemSpecBackend"


def test_a_bad_workdir_url_is_one_line_before_anything_runs(tmp_path):
  r = subprocess.run([sys.executable, "train.py", "--workdir=ftp://host/run"], cwd=REPO,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      "error: --workdir=ftp://host/run: unsupported URL scheme ftp:// (supported: gs://, s3://, "
      "or a local path)"]
  assert not os.path.exists(os.path.join(REPO, "ftp:"))


# --- the lock --------------------------------------------------------------------------------

def test_the_lock_object_refuses_a_live_run_and_takes_over_a_dead_one(gcs):
  work = paths.resolve(f"{ROOT}/locked", "--workdir")
  fs, key = paths.filesystem(f"{work}/.lock.process0")
  with locks.workdir_lock(work) as held:
    record = json.loads(fs.cat_file(key))
    assert record["pid"] == os.getpid() and record["token"] == held.token
    with pytest.raises(locks.WorkdirInUse, match=rf"^workdir {work} is in use by another run "
                       rf"\(host {os.uname().nodename}, pid {os.getpid()}, process 0, heartbeat"):
      with locks.workdir_lock(work):
        pass
  assert not fs.exists(key)                                  # released: the object is gone
  # A live holder on another host, heartbeat fresh: refused.
  fs.pipe_file(key, json.dumps({"host": "other-host", "pid": 1, "process": 0,
                                "heartbeat": time.time()}).encode())
  with pytest.raises(locks.WorkdirInUse, match="host other-host, pid 1"):
    with locks.workdir_lock(work):
      pass
  # Its heartbeat stopped STALE_S ago (a preempted host): taken over.
  fs.pipe_file(key, json.dumps({"host": "other-host", "pid": 1, "process": 0,
                                "heartbeat": time.time() - locks.STALE_S - 1}).encode())
  with locks.workdir_lock(work) as lock:
    assert lock.took_over["host"] == "other-host"
  # A holder on this host whose process is dead (kill -9): taken over at once.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  fs.pipe_file(key, json.dumps({"host": os.uname().nodename, "pid": int(dead), "process": 0,
                                "heartbeat": time.time()}).encode())
  with locks.workdir_lock(work) as lock:
    assert lock.took_over["pid"] == int(dead)


def test_the_lock_heartbeat_is_rewritten_while_held(gcs):
  work = paths.resolve(f"{ROOT}/beating", "--workdir")
  fs, key = paths.filesystem(f"{work}/.lock.process0")
  with locks.ObjectLock(work, heartbeat_s=0.2) as lock:
    first = json.loads(fs.cat_file(key))["heartbeat"]
    deadline = time.time() + 10
    while json.loads(fs.cat_file(key))["heartbeat"] == first and time.time() < deadline:
      time.sleep(0.1)
    assert json.loads(fs.cat_file(key))["heartbeat"] > first
    assert json.loads(fs.cat_file(key))["token"] == lock.token


# --- checkpoints -----------------------------------------------------------------------------

def test_changed_bytes_of_an_object_are_detected_and_never_trusted(gcs):
  model = models.SPADNet(scale=8, n_feats=4, number=1, reduction=2)
  variables = jax.device_get(checkpoint.abstract_variables(model))
  variables = jax.tree_util.tree_map(lambda a: np.full(a.shape, 0.5, a.dtype), variables)
  where = checkpoint.save_inference_checkpoint(f"{ROOT}/damaged", model, variables, step=3)
  assert where == f"{ROOT}/damaged/3"
  assert checksums.verify(f"{ROOT}/damaged", 3) is True
  _, restored, step = checkpoint.load_model(f"{ROOT}/damaged")
  assert step == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, jax.device_get(restored))
  # Rewrite one data object through the API: same size, one byte changed.
  fs = _fs()
  names = [n for n in _objects(where) if n.startswith("params/") and "/d/" in n]
  key = f"{BUCKET}/damaged/3/{names[0]}"
  data = bytearray(fs.cat_file(key))
  data[len(data) // 2] ^= 0xFF
  fs.pipe_file(key, bytes(data))
  with pytest.raises(checksums.DamagedCheckpoint,
                     match=rf"^checkpoint step 3 is damaged: {ROOT}/damaged/3/{names[0]} does not "
                           "match its checksum$"):
    checksums.verify(f"{ROOT}/damaged", 3)
  with pytest.raises(checksums.DamagedCheckpoint, match="does not match its checksum"):
    checkpoint.load_model(f"{ROOT}/damaged")


@pytest.fixture(scope="module")
def bucket_runs(gcs, tmp_path_factory):
  """Three tiny runs into the bucket, in this process: 'full' (4 steps), and 'resumed' (2
  steps, then rerun to 4), with the data set in a gs:// data_dir built on first use from
  an empty local cache."""
  cache = tmp_path_factory.mktemp("cache")
  previous = os.environ.get("SPADNET_CACHE_DIR")
  os.environ["SPADNET_CACHE_DIR"] = str(cache)
  cwd = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("cwd"))
  try:
    data = f"{ROOT}/data"
    for name, steps in (("full", 4), ("resumed", 2), ("resumed", 4)):
      cfg = tiny_config(data, num_train_steps=steps, checkpoint_every=2, num_grid_images=2,
                        eval_every=4)
      trainer.train_and_evaluate(cfg, f"{ROOT}/{name}")
    leftovers = os.listdir(".")
  finally:
    os.chdir(cwd)
    if previous is None:
      os.environ.pop("SPADNET_CACHE_DIR")
    else:
      os.environ["SPADNET_CACHE_DIR"] = previous
  return {"data": data, "cache": str(cache), "leftovers": leftovers}


def test_a_run_writes_everything_into_the_bucket_and_resumes_from_it(bucket_runs):
  assert bucket_runs["leftovers"] == []          # nothing local: no ./gs:/... folder
  found = _objects(f"{ROOT}/resumed")
  for name in ("config.json", "metrics.json", "per_image.csv", "grids/step_000004.png",
               "checkpoints/2/checksums.json", "checkpoints/4/checksums.json",
               "checkpoints/4/commit_success.txt"):
    assert name in found, (name, sorted(found))
  assert not [n for n in found if n.startswith(".lock")]      # released at the end
  events = [n for n in found if n.startswith("events.out.tfevents")]
  assert len(events) == 2                                      # one per run
  written = b"".join(_fs().cat_file(f"{BUCKET}/resumed/{n}") for n in events)
  for tag in (b"train_loss_sr_l1", b"test_psnr_y", b"| PSNR (Y) |"):
    assert tag in written, tag
  metrics = json.loads(_fs().cat_file(f"{BUCKET}/resumed/metrics.json"))
  assert metrics["step"] == 4 and np.isfinite(metrics["psnr_y"])
  # Resumed at step 2, the run ends where the uninterrupted one does, bit for bit.
  _, a, _ = checkpoint.load_model(f"{ROOT}/full/checkpoints")
  _, b, step = checkpoint.load_model(f"{ROOT}/resumed/checkpoints")
  assert step == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_resuming_an_older_step_sets_the_newer_ones_aside_in_the_bucket(bucket_runs, capsys):
  cfg = tiny_config(bucket_runs["data"], num_train_steps=2, checkpoint_every=2, eval_every=4)
  before = {n: s for n, s in _objects(f"{ROOT}/full/checkpoints").items() if n.startswith("4/")}
  trainer.train_and_evaluate(cfg, f"{ROOT}/full", step=2)
  out = capsys.readouterr().out
  assert (f"moved checkpoint step 4 to {ROOT}/full/checkpoints.set_aside/4: training goes on "
          "from step 2") in out
  assert checkpoint.steps(f"{ROOT}/full/checkpoints") == [2]
  aside = _objects(f"{ROOT}/full/checkpoints.set_aside/4")
  assert aside == {n[2:]: s for n, s in before.items()}      # every object kept, none lost
  assert checksums.verify(f"{ROOT}/full/checkpoints.set_aside", 4)


def test_a_data_set_is_built_into_a_bucket_and_read_from_it(bucket_runs, tmp_path, monkeypatch):
  found = _objects(bucket_runs["data"])
  version = "synthetic_faces/tiny/1.0.0"
  for name in ("dataset_info.json", "provenance.json",
               "synthetic_faces-train.array_record-00000-of-00001"):
    assert f"{version}/{name}" in found, sorted(found)
  # Another machine (an empty local cache) reads the bucket's copy instead of building.
  monkeypatch.setenv("SPADNET_CACHE_DIR", str(tmp_path))
  from spadnet_jax.data import pipeline, remote
  from spadnet_jax.data import builders
  called = []
  monkeypatch.setattr(builders.SyntheticFaces, "_generate_examples",
                      lambda self, *a, **k: called.append(1) or iter(()))
  data = pipeline.Data(tiny_config(bucket_runs["data"]).data)
  assert not called
  assert data.num_examples("train") == 48
  local = os.path.join(remote.local_data_dir(bucket_runs["data"]), version)
  assert data.location == local
  with open(os.path.join(local, "dataset_info.json"), "rb") as f:
    assert f.read() == _fs().cat_file(f"{BUCKET}/data/{version}/dataset_info.json")


@pytest.mark.slow
def test_eval_and_predict_read_the_checkpoint_from_the_bucket(bucket_runs, tmp_path):
  r = _program("eval.py", f"--workdir={ROOT}/resumed", "--num_images=8", "--num_grids=1",
               cwd=str(tmp_path), cache=bucket_runs["cache"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert f"wrote {ROOT}/resumed/eval/4/metrics.json" in r.stdout
  found = _objects(f"{ROOT}/resumed/eval/4")
  assert {"metrics.json", "per_image.csv"} <= set(found) and len(
      [n for n in found if n.startswith("sr/")]) == 8
  faces = tmp_path / "faces"
  faces.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(faces / f"f{i}.png")
  r = _program("spadnet_jax.predict", "--checkpoint", f"{ROOT}/resumed/checkpoints", "--input",
               str(faces), "--output", str(tmp_path / "out"), cwd=str(tmp_path),
               cache=str(tmp_path / "cache"))
  assert r.returncode == 0, r.stdout + r.stderr
  assert "(step 4)" in r.stdout
  assert sorted(os.listdir(tmp_path / "out")) == ["f0.png", "f1.png"]
  assert Image.open(tmp_path / "out" / "f0.png").size == (128, 128)


@pytest.mark.slow
def test_a_second_run_on_a_bucket_workdir_is_refused_by_the_lock(gcs, tmp_path):
  work = f"{ROOT}/busy"
  with locks.workdir_lock(paths.resolve(work, "--workdir")):
    r = _program("train.py", *_train_args(work, f"{ROOT}/data"), cwd=str(tmp_path),
                 cache=str(tmp_path / "cache"))
  assert r.returncode == 1, r.stdout + r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir {work} is in use by another run (host {os.uname().nodename}, "
      f"pid {os.getpid()}, process 0, heartbeat ")


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_resumes_from_the_last_intact_step(gcs, tmp_path):
  work, cache = f"{ROOT}/killed", str(tmp_path / "cache")
  ckpts = f"{work}/checkpoints"
  every = ("--config.checkpoint_every=1", "--config.keep_checkpoints=1000")
  args = _train_args(work, f"{ROOT}/data", "--config.num_train_steps=400", *every)
  p = _program("train.py", *args, cwd=str(tmp_path), cache=cache, popen=True)
  partial = None
  try:
    deadline = time.time() + 300
    while partial is None and time.time() < deadline and p.poll() is None:
      found = _objects(ckpts)
      started = {n.split("/")[0] for n in found if n.split("/")[0].isdigit()}
      done = {n.split("/")[0] for n in found
              if n.count("/") == 1 and n.endswith("/commit_success.txt")}
      if started - done and done:
        partial = sorted(int(s) for s in started - done)
  finally:
    p.send_signal(signal.SIGKILL)
    p.communicate()
  assert partial, "no checkpoint write was caught in progress"
  intact = [s for s in checkpoint.steps(ckpts) if checksums.is_sealed(ckpts, s)]
  last = max(partial) + 1
  r = _program("train.py", *_train_args(work, f"{ROOT}/data", f"--config.num_train_steps={last}",
                                        *every), cwd=str(tmp_path), cache=cache)
  assert r.returncode == 0, r.stdout + r.stderr
  resumed = int(r.stdout.split("resumed from step ")[1].split()[0])
  assert max(intact) <= resumed < min(partial), (resumed, intact, partial)
  assert checkpoint.steps(ckpts)[0] == last and checksums.verify(ckpts, last)


@pytest.mark.slow
def test_two_processes_sharing_only_the_bucket_train_and_resume(gcs, tmp_path):
  import portpicker
  work = f"{ROOT}/pod"
  outputs = []
  for steps in (2, 4):
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
      host = tmp_path / f"host{i}"          # each "host" has its own disk: cwd and cache
      host.mkdir(exist_ok=True)
      procs.append(_program(
          "train.py", *_train_args(work, f"{ROOT}/pod-data", f"--config.num_train_steps={steps}",
                                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}"),
          cwd=str(host), cache=str(host / "cache"), popen=True,
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    outputs.append(outs[0])
    for i in range(2):
      assert sorted(os.listdir(tmp_path / f"host{i}")) == ["cache"]   # nothing else local
  assert "resumed from step 2" in outputs[1]
  assert checkpoint.steps(f"{work}/checkpoints") == [4, 2]
  assert checksums.verify(f"{work}/checkpoints", 4)
  assert not [n for n in _objects(work) if n.startswith(".lock")]
