"""Several processes (127.0.0.1, gloo): data preparation, resumption across process counts,
preemption at staggered moments and a lost peer, with real signals to real processes."""
import os
import signal
import time

import pytest
import tensorflow_datasets as tfds

import spadnet_jax.data  # noqa: F401  (registers the tfds builders)
from spadnet_jax import checkpoint
from tests.train_helpers import losses, run_train, start_processes, wait_for_line

pytestmark = pytest.mark.slow     # every test here starts processes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_faces/tiny", data_dir=d, file_format="array_record").download_and_prepare()
  return d


def _finish(procs, timeout=300):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except Exception:
      p.kill()
      outs.append(p.communicate()[0] + "\n(killed: timed out)")
  return outs


def _close(expected, got):
  for s, v in got.items():
    assert v == pytest.approx(expected[s], rel=2e-3, abs=2e-4), s


def test_fresh_data_dir_and_resume_across_process_counts(tmp_path, data_dir):
  ref = run_train(str(tmp_path / "ref"), data_dir, "--config.num_train_steps=6")
  assert ref.returncode == 0, ref.stdout + ref.stderr
  expected = losses(ref.stdout)
  # Two processes on an empty data directory: it is built once, then steps 1-2.
  fresh, work = str(tmp_path / "fresh_tfds"), str(tmp_path / "work")
  outs = _finish(start_processes(work, fresh, "--config.num_train_steps=2"))
  for out in outs:
    assert "resumed" not in out and "Traceback" not in out, out
  assert "on 4 device(s)" in outs[0]
  assert sorted(os.listdir(os.path.join(fresh, "synthetic_faces", "tiny"))) == ["1.0.0"]
  _close(expected, losses(outs[0]))
  # One process resumes the two-process checkpoint (steps 3-4) ...
  one = run_train(work, fresh, "--config.num_train_steps=4")
  assert one.returncode == 0, one.stdout + one.stderr
  assert "resumed from step 2" in one.stdout
  _close(expected, losses(one.stdout))
  assert set(losses(one.stdout)) == {3, 4}
  # ... and two processes resume that one (steps 5-6): the same global batches throughout.
  outs = _finish(start_processes(work, fresh, "--config.num_train_steps=6"))
  assert "resumed from step 4" in outs[0], outs[0]
  assert set(losses(outs[0])) == {5, 6}
  _close(expected, losses(outs[0]))


def test_sigterm_to_one_process_then_another_stops_all_at_one_step(tmp_path, data_dir):
  # Process 1 alone is signalled first, as the asynchronous save of step 2 starts (the
  # others learn of it at the next sync point); process 0 gets its own signal seconds
  # later, possibly while stopping.
  procs = start_processes(str(tmp_path), data_dir, "--config.num_train_steps=100000",
                          "--config.checkpoint_every=2", "--config.preemption_sync_every=3")
  head = wait_for_line(procs[0], "step 2/")
  first = time.time()
  procs[1].send_signal(signal.SIGTERM)
  time.sleep(3)
  procs[0].send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=120)
  elapsed = time.time() - first
  outs[0] = head + outs[0]
  assert [p.returncode for p in procs] == [75, 75], outs
  assert elapsed < 60, elapsed
  saved = [int(line.split("at step ")[1].split(";")[0]) for line in outs[0].splitlines()
           if line.startswith("preempted: saved a checkpoint at step")]
  assert len(saved) == 1
  ckpts = str(tmp_path / "checkpoints")
  assert checkpoint.steps(ckpts)[0] == saved[0]         # the newest step, complete and sealed
  assert all(checkpoint.verify(ckpts, s) for s in checkpoint.steps(ckpts))
  assert saved[0] % 3 == 0                               # a sync point every process reached


def test_sigterm_to_both_at_once_while_compiling_stops_before_the_first_step(tmp_path, data_dir):
  procs = start_processes(str(tmp_path), data_dir, "--config.num_train_steps=100000")
  head = wait_for_line(procs[0], "data: ")
  for p in procs:                                   # the same instant
    p.send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=120)
  outs[0] = head + outs[0]
  assert [p.returncode for p in procs] == [75, 75], outs
  assert "preempted: stopped before training step 1, with nothing new to save" in outs[0]
  assert checkpoint.steps(str(tmp_path / "checkpoints")) == []


def test_a_lost_peer_ends_the_others_in_bounded_time(tmp_path, data_dir):
  procs = start_processes(str(tmp_path), data_dir, "--config.num_train_steps=100000",
                          "--heartbeat_timeout=10")
  wait_for_line(procs[0], "step 2/")
  procs[1].kill()
  start = time.time()
  out = _finish(procs[:1], timeout=90)[0]
  assert time.time() - start < 60
  assert procs[0].returncode != 0
  assert "another task died" in out, out[-3000:]
