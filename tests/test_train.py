"""Training: the whole loop on a tiny config, resumption, sharding, failures and preemption."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from spadnet_jax import checkpoint, preemption, trainer
from tests.conftest import REPO
from tests.train_helpers import losses, run_train, tiny_config, wait_for_line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_faces/tiny", data_dir=d, file_format="array_record").download_and_prepare()
  return d


def _params(workdir, step=None):
  _, variables, step = checkpoint.load_model(os.path.join(workdir, "checkpoints"), step)
  return variables, step


def test_train_writes_metrics_and_checkpoints(tmp_path, data_dir, capsys):
  cfg = tiny_config(data_dir, num_train_steps=16, log_every=8, eval_every=8, checkpoint_every=8)
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  out = capsys.readouterr().out
  assert "steps/s" in out and "ETA" in out and "| PSNR (Y) |" in out
  # Each loss term on the progress line; the default's heatmap term falls from the start
  # (means over steps 1-8 and 9-16).
  terms = [float(h) for h in re.findall(
      r"^step \d+/16 loss [0-9.]+ \(heatmap_peak_l2 ([0-9.]+), sr_l1 [0-9.]+\) \|", out, re.M)]
  assert len(terms) == 2 and terms[1] < 0.7 * terms[0], terms
  assert "validation at step 8 (8 images): PSNR-Y" in out and "NME" in out
  assert (tmp_path / "grids" / "step_000008.png").is_file()
  assert f"comparison grid (LR | bicubic | SR | HR | heatmap): {tmp_path}/grids/step_000016.png" in out
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  for key in ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "nme", "images_per_s"):
    assert np.isfinite(metrics[key]), key
  assert metrics["num_images"] == 20 and summary["step"] == 16
  assert checkpoint.steps(str(tmp_path / "checkpoints")) == [16, 8]
  events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
  assert events
  written = b"".join((tmp_path / f).read_bytes() for f in events)
  for tag in (b"train_loss_heatmap_peak_l2", b"train_loss_sr_l1", b"eval_nme", b"test_psnr_y",
              b"test_table", b"| PSNR (Y) |"):
    assert tag in written, tag                          # the final table reaches TensorBoard
  variables, step = _params(str(tmp_path))
  assert step == 16 and np.isfinite(np.asarray(variables["params"]["head"]["kernel"])).all()


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, data_dir):
  full = tiny_config(data_dir, num_train_steps=6, checkpoint_every=3)
  trainer.train_and_evaluate(full, str(tmp_path / "a"))
  trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=3, checkpoint_every=3),
                             str(tmp_path / "b"))
  trainer.train_and_evaluate(full, str(tmp_path / "b"))            # resumes at step 3
  (a, _), (b, step) = _params(str(tmp_path / "a")), _params(str(tmp_path / "b"))
  assert step == 6
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_options_bf16_clip_remat_ema(tmp_path, data_dir):
  cfg = tiny_config(data_dir, **{"model.dtype": "bfloat16", "model.remat": "all",
                                 "optimizer.grad_clip": 0.5, "optimizer.ema_decay": 0.5})
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert np.isfinite(summary["psnr_y"])
  r = checkpoint.read_items(str(tmp_path / "checkpoints"), 4)
  ema, raw = r["params"]["params"]["head"]["kernel"], r["train"]["params"]["head"]["kernel"]
  assert ema.dtype == np.float32 and not np.array_equal(ema, raw)


def _nan_batches_from(monkeypatch, first_step):
  """Batches of step `first_step` on (1-based) carry a NaN: a genuinely bad example."""
  real, calls = trainer.sharding.global_batch, [0]

  def global_batch(local, mesh):
    calls[0] += 1
    if calls[0] >= first_step:
      local = {**local, "hr": np.full_like(local["hr"], np.nan)}
    return real(local, mesh)

  monkeypatch.setattr(trainer.sharding, "global_batch", global_batch)


def test_nonfinite_stop_waits_for_the_inflight_save_and_names_it(tmp_path, data_dir, monkeypatch):
  _nan_batches_from(monkeypatch, 3)
  cfg = tiny_config(data_dir, num_train_steps=6, checkpoint_every=2)
  with pytest.raises(FloatingPointError, match=r"non-finite loss, gradient or updated state at step "
                     r"2 .*last good checkpoint: step 2 in"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["2"]                # finalised, no orbax tmp folder left
  assert checkpoint.verify(str(ckpts), 2)                  # sealed with checksums
  monkeypatch.undo()
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))  # the rerun resumes from step 2
  assert summary["step"] == 6


def test_nonfinite_update_of_finite_gradients_is_never_applied(tmp_path, data_dir):
  # 1e39 is a finite Python float but inf in float32: loss and gradients are finite, the
  # updated parameters are not. The guard must refuse the update, and nothing is saved.
  cfg = tiny_config(data_dir, **{"optimizer.learning_rate": 1e39, "num_train_steps": 2})
  with pytest.raises(FloatingPointError, match=r"at step 0 .*no checkpoint was saved"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  assert checkpoint.steps(str(tmp_path / "checkpoints")) == []


def test_nonfinite_skip_counts_reports_and_fails_a_diverged_run(tmp_path, data_dir, capsys):
  cfg = tiny_config(data_dir, nonfinite="skip", **{"optimizer.learning_rate": 1e39})
  with pytest.raises(FloatingPointError, match=r"4 of 4 updates were skipped .*"
                     r"config.max_skipped_fraction=0.01"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  out = capsys.readouterr().out
  assert "step 1/4 loss" in out and "| skipped 1 |" in out and "| skipped 4 |" in out
  assert json.loads((tmp_path / "metrics.json").read_text())["skipped_updates"] == 4
  train = checkpoint.read_items(str(tmp_path / "checkpoints"), 4, ("train",))["train"]
  assert int(train["nonfinite"]) == 4 and int(train["first_nonfinite"]) == 0
  # Within the allowed fraction the run succeeds and still reports the count.
  cfg = tiny_config(data_dir, nonfinite="skip", max_skipped_fraction=1.0,
                    **{"optimizer.learning_rate": 1e39})
  assert trainer.train_and_evaluate(cfg, str(tmp_path / "ok"))["skipped_updates"] == 4


@pytest.mark.parametrize("override,message", [
    ({"model.scale": 3}, r"config.model.scale must be one of \(4, 8, 16\), got 3"),
    ({"eval_batch_size": 0}, r"config.eval_batch_size=0 must be an integer >= 1"),
    ({"data.name": "no_such_faces"}, r"config.data.name='no_such_faces' is not a registered data"),
    ({"loss.sr_l2": 1.0}, r"config.loss.sr_l2: no loss term named 'sr_l2' is registered"),
    ({"loss.heatmap_l1": -1.0}, r"config.loss.heatmap_l1=-1.0 must be a finite number >= 0"),
    ({"data.name": "face_folder/helen"}, r"config.data.manual_dir must point at"),
    ({"model.gsac_gate": "pixel"}, r"config.model: SPADNet.gsac_gate must be"),
    ({"nonfinite": "ignore"}, r"config.nonfinite='ignore' must be one of \['stop', 'skip'\]"),
    ({"checkpoint_every": 0}, r"config.checkpoint_every=0 must be an integer >= 1"),
    ({"log_every": 0}, r"config.log_every=0 must be an integer >= 1"),
    ({"optimizer.learning_rate": float("nan")}, r"config.optimizer.learning_rate=nan must be a "
     r"finite number > 0"),
    ({"optimizer.learning_rate": -1e-3}, r"config.optimizer.learning_rate=-0.001 must be"),
    ({"data.lr_kernel": "foo"}, r"config.data.lr_kernel='foo' must be one of \['matlab', 'pil'\]"),
    ({"metric_score": "jpeg"}, r"config.metric_score='jpeg' must be one of"),
    ({"heatmap_loss_weight": float("nan")}, r"config.heatmap_loss_weight=nan must be a finite"),
    ({"max_skipped_fraction": 2.0}, r"config.max_skipped_fraction=2.0 must be in \[0, 1\]"),
    ({"preemption_sync_every": 0}, r"config.preemption_sync_every=0 must be an integer >= 1"),
])
def test_invalid_config_fails_before_compiling(tmp_path, data_dir, override, message, monkeypatch):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(tiny_config(data_dir, **override), str(tmp_path))


def test_batch_not_divisible_by_devices_is_named(data_dir):
  with pytest.raises(ValueError, match=r"config.batch_size=6 must be a positive multiple of the 4"):
    trainer.validate_config(tiny_config(data_dir, batch_size=6), 4)


@pytest.mark.slow
def test_eight_devices_match_one_and_restore_onto_one(tmp_path, data_dir):
  one = run_train(str(tmp_path / "one"), data_dir, "--config.num_train_steps=4")
  eight = run_train(str(tmp_path / "eight"), data_dir, "--config.num_train_steps=2", devices=8)
  assert one.returncode == 0, one.stdout + one.stderr
  assert eight.returncode == 0, eight.stdout + eight.stderr
  assert one.stderr == "" and eight.stderr == ""          # quiet: a person reads stdout
  assert "on 8 device(s)" in eight.stdout
  l1, l8 = losses(one.stdout), losses(eight.stdout)
  assert set(l8) == {1, 2}
  for s in l8:
    assert l8[s] == pytest.approx(l1[s], rel=2e-3, abs=2e-4)
  # The 8-device checkpoint resumes on 1 device (step 3), that one on 8 again with
  # parameters and optimizer state sharded 4 ways (FSDP, step 4); both continue where the
  # 1-device run was.
  resumed = run_train(str(tmp_path / "eight"), data_dir, "--config.num_train_steps=3")
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from step 2" in resumed.stdout
  back = run_train(str(tmp_path / "eight"), data_dir, "--config.num_train_steps=4",
                   "--config.fsdp=4", devices=8)
  assert back.returncode == 0, back.stdout + back.stderr
  assert "resumed from step 3" in back.stdout and "on 8 device(s)" in back.stdout
  assert "mesh {'data': 2, 'fsdp': 4}" in back.stdout
  l_resumed = {**losses(resumed.stdout), **losses(back.stdout)}
  assert set(l_resumed) == {3, 4}
  for s in (3, 4):
    assert l_resumed[s] == pytest.approx(l1[s], rel=2e-3, abs=2e-4)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, data_dir):
  p = run_train(str(tmp_path), data_dir, "--config.num_train_steps=100000",
                "--config.checkpoint_every=100000", popen=True)
  lines = []
  deadline = time.time() + 300
  for line in p.stdout:
    lines.append(line)
    if line.startswith("step 2/") or time.time() > deadline:
      break
  p.send_signal(signal.SIGTERM)
  out = "".join(lines) + p.communicate(timeout=300)[0]
  assert p.returncode == 75, out                           # preempted, distinct from 0 and 1
  assert "preempted: saved a checkpoint at step" in out
  _, step = _params(str(tmp_path))
  assert step >= 2


@pytest.mark.slow
def test_sigterm_while_starting_or_compiling_stops_before_the_first_step(tmp_path, data_dir):
  p = run_train(str(tmp_path), data_dir, popen=True)
  head = wait_for_line(p, "data: ")        # printed before the train state, resume and compile
  p.send_signal(signal.SIGTERM)
  out = head + p.communicate(timeout=300)[0]
  assert p.returncode == 75, out
  assert "preempted: stopped before training step 1, with nothing new to save" in out, out
  assert "step 1/" not in out
  assert checkpoint.steps(str(tmp_path / "checkpoints")) == []


def test_a_sigterm_during_start_up_becomes_the_trainers_stop_request():
  """A real SIGTERM to this process before the trainer's handler exists is not lost."""
  before = signal.getsignal(signal.SIGTERM)
  early = preemption.EarlySignal.install()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    assert early.received
    with preemption.StopRequest() as stop:
      assert stop.requested and stop.agreed(0, sync=True)
  finally:
    signal.signal(signal.SIGTERM, before)
  preemption.EarlySignal.install()
  try:
    with preemption.StopRequest() as stop:
      assert not stop.requested and not stop.agreed(0, sync=True)
    assert signal.getsignal(signal.SIGTERM) is before    # the handler before start-up is back
  finally:
    signal.signal(signal.SIGTERM, before)


def test_keeps_last_checkpoints_plus_the_best_by_psnr(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=2)
  for step, psnr in [(1, 10.0), (2, 30.0), (3, 20.0), (4, None), (5, None)]:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave({"a": np.ones(2)})),
              metrics=None if psnr is None else {"psnr_y": psnr}, force=True)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [2, 4, 5]


def test_rerunning_a_finished_run_evaluates_without_compiling_the_train_step(
    tmp_path, data_dir, capsys, monkeypatch):
  trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), str(tmp_path))
  monkeypatch.setattr(trainer, "_compile_train_step",
                      lambda *a, **k: pytest.fail("compiled the train step of a finished run"))
  summary = trainer.train_and_evaluate(tiny_config(data_dir, num_train_steps=2), str(tmp_path))
  assert "training already finished at step 2" in capsys.readouterr().out
  assert summary["step"] == 2 and np.isfinite(summary["psnr_y"])


@pytest.mark.slow
def test_help_lists_flags_and_every_config_field_and_exits_0():
  r = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True,
                     text=True, timeout=120, env={**os.environ, "SPADNET_NO_RESTART": "1"})
  assert r.returncode == 0 and r.stderr == "", r.stderr
  lines = r.stdout.splitlines()
  assert "--workdir: Checkpoints, TensorBoard events and metrics.json." in r.stdout
  assert any(l.strip().startswith("--coordinator_address: host:port of process 0.") for l in lines)
  assert re.search(r"^  model\.n_feats = 16 +feature channels \(the paper: 64\)$", r.stdout, re.M)
  assert re.search(r"^  loss\.heatmap_peak_l2 = 1\.0 +squared error weighted", r.stdout, re.M)
  rows = [l for l in lines if re.match(r"^  [a-z_.0-9]+ = ", l)]
  fields = [l.split(" = ")[0].strip() for l in rows]
  assert len(fields) == len(set(fields)) >= 50 and "optimizer.learning_rate" in fields
  assert all(re.match(r"^  \S+ = .*\S  +\S", l) for l in rows), [l for l in rows if "  " not in l[2:]]


@pytest.mark.slow
@pytest.mark.parametrize("flag,message", [
    ("--config.foo=1", "error: config has no field 'foo' (tests/tiny_config.py)"),
    ("--config.optimizer.learning_rat=1", "error: config has no field 'optimizer.learning_rat' "
     "(did you mean 'optimizer.learning_rate'?) (tests/tiny_config.py)"),
])
def test_unknown_config_field_is_one_line(tmp_path, data_dir, flag, message):
  r = run_train(str(tmp_path), data_dir, flag)
  assert r.returncode == 2 and r.stderr.strip() == message, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "checkpoints")
