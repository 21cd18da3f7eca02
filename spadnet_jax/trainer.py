"""One training loop for every topology: jit over a Mesh, Orbax checkpoints, clu reporting.

train_and_evaluate(config, workdir) is what train.py runs. The same code runs on one CPU,
simulated CPU devices, a GPU or several hosts; only the mesh differs.
"""

import errno
import functools
import os
import shutil
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics as clu_metrics, periodic_actions
from jax.experimental import multihost_utils

from spadnet_jax import (checkpoint, config_check, evaluate_lib, evaluation, files, platform,
                         preemption, sharding, visualize)
from spadnet_jax.data import pipeline
from spadnet_jax.models import SCALES, SPADNet


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  nonfinite: jax.Array          # updates skipped: loss, gradient or updated state not finite
  first_nonfinite: jax.Array    # step of the first such update, -1 if none


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  loss_sr: clu_metrics.Average.from_output("loss_sr")
  loss_heatmap: clu_metrics.Average.from_output("loss_heatmap")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


def build_model(cfg: ml_collections.ConfigDict) -> SPADNet:
  """The SPADNet described by config.model (dtype given by name)."""
  fields = cfg.model.to_dict()
  if fields.get("hab_num") is not None and fields["hab_num"] < 0:
    fields["hab_num"] = None
  try:
    return checkpoint.model_from_config(fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from e


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fail before any compilation, naming the offending field."""
  if cfg.model.scale not in SCALES:
    raise ValueError(f"config.model.scale must be one of {SCALES}, got {cfg.model.scale}")
  config_check.validate(cfg, num_devices)
  build_model(cfg).check()


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int):
  """Adam with the paper's step decay (factor at each boundary epoch), optional clipping."""
  o = cfg.optimizer
  boundaries = {int(e * steps_per_epoch): o.decay_factor for e in o.decay_epochs}
  schedule = optax.piecewise_constant_schedule(o.learning_rate, boundaries)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps))
  return optax.chain(*parts), schedule


def init_state(model: SPADNet, tx: optax.GradientTransformation, rng: jax.Array,
               ema: bool) -> TrainState:
  params = model.init(rng, model.example_input())["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params if ema else None, nonfinite=jnp.zeros((), jnp.int32),
                    first_nonfinite=jnp.full((), -1, jnp.int32))


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of a pytree is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model: SPADNet, tx: optax.GradientTransformation, schedule,
                    heatmap_weight: float, ema_decay: float):
  """(state, batch) -> (state, metrics). The update is skipped (and counted) unless the loss,
  the gradient norm and the updated parameters' norm are finite; Adam's moments and the
  EMA are then convex combinations of finite values, so the whole new state is finite."""

  def loss_fn(params, batch):
    sr, hm = model.apply({"params": params}, batch["lr_up"])
    loss_sr = jnp.mean(jnp.abs(sr - batch["hr"]))
    loss_hm = jnp.mean(jnp.abs(hm - batch["heatmap"])) if hm is not None else jnp.zeros(())
    return loss_sr + heatmap_weight * loss_hm, (loss_sr, loss_hm)

  def step(state: TrainState, batch):
    (loss, (loss_sr, loss_hm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite gradient (its norm) keeps Adam's moments finite; finite updated parameters
    # also catch an update that overflows (e.g. a learning rate beyond float32).
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(params)))
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    ema = state.ema_params
    if ema is not None:
      ema = keep(optax.incremental_update(params, ema, 1.0 - ema_decay), ema)
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step,
                                  state.first_nonfinite))
    out = TrainMetrics.single_from_model_output(
        loss=loss, loss_sr=loss_sr, loss_heatmap=loss_hm, grad_norm=grad_norm,
        learning_rate=schedule(state.step))
    return new, out

  return step


def inference_params(state: TrainState) -> Any:
  return state.ema_params if state.ema_params is not None else state.params


def _train_item(state: TrainState) -> dict[str, Any]:
  """The 'train' checkpoint item: what resuming needs beyond the inference params (and the
  raw params too when EMA weights are the inference ones). Works on abstract states too."""
  train = {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite,
           "first_nonfinite": state.first_nonfinite}
  if state.ema_params is not None:
    train["params"] = state.params
  return train


def _from_items(inference: Any, t: dict[str, Any], ema: bool) -> TrainState:
  if ema:
    return TrainState(t["step"], t["params"], t["opt_state"], inference, t["nonfinite"],
                      t["first_nonfinite"])
  return TrainState(t["step"], inference, t["opt_state"], None, t["nonfinite"], t["first_nonfinite"])


class DiskFull(OSError):
  """No space left while writing a checkpoint; earlier steps are untouched."""

  def __str__(self) -> str:
    return self.strerror


def _is_disk_full(e: BaseException | None) -> bool:
  while e is not None:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _resume(ckpt_dir: str, step: int | None, abstract: TrainState, report: Callable[[str], None],
            is_main: bool) -> tuple[TrainState, dict[str, Any] | None] | None:
  """Restore the newest intact step (or `step`): verified checksums, finite values.

  Steps newer than the one restored (damaged ones, or all newer ones when `step` is
  given) are moved to checkpoints.set_aside/ so that training can go on from it; nothing
  is deleted. Returns None when there is nothing to resume.
  """
  if is_main:
    for s in checkpoint.seal_finalized(ckpt_dir):
      report(f"checkpoint step {s} was finalised but not sealed when its run stopped; sealed it")
  _sync("spadnet_sealed")
  if not checkpoint.steps(ckpt_dir):
    if step is not None:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint steps to resume step {step} from")
    return None
  ema = abstract.ema_params is not None

  def restore(s: int) -> tuple[TrainState, dict[str, Any] | None]:
    with checkpoint.manager(ckpt_dir, read_only=True) as mngr:
      inference, train, position = checkpoint.restore_train(
          mngr, s, abstract.ema_params if ema else abstract.params, _train_item(abstract))
    state = _from_items(inference, train, ema)
    if not bool(jax.device_get(jax.jit(all_finite)(state))):
      raise checkpoint.DamagedCheckpoint(f"checkpoint step {s} in {ckpt_dir} holds non-finite values")
    return state, position

  restored, result = checkpoint.restore_newest_intact(ckpt_dir, step, restore, report)
  if is_main:
    newer = [s for s in checkpoint.steps(ckpt_dir) if s > restored]
    aside = os.path.join(os.path.dirname(ckpt_dir), "checkpoints.set_aside")
    for s in newer:
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(s))
      if os.path.exists(target):
        target = f"{target}.{int(time.time())}"
      shutil.move(os.path.join(ckpt_dir, str(s)), target)
      report(f"moved checkpoint step {s} to {target}: training goes on from step {restored}")
  _sync("spadnet_set_aside")
  return result


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None) -> dict[str, Any]:
  """Train (resuming from workdir's newest intact checkpoint, or `step`), then evaluate.

  Returns the summary, or {'preempted_at': step} when a stop request (SIGTERM) ended
  training early. One run per workdir: a second one fails with files.WorkdirInUse
  naming the holder.
  """
  mesh = sharding.make_mesh(cfg.fsdp)
  validate_config(cfg, mesh.size)
  model = build_model(cfg)
  workdir = os.path.abspath(workdir)
  with files.WorkdirLock(workdir, jax.process_index()), \
       preemption.StopRequest(cfg.preemption_sync_every) as stop:
    return _train(cfg, workdir, mesh, model, step, stop)


def _train(cfg: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           model: SPADNet, resume_step: int | None,
           stop: preemption.StopRequest) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  report = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)

  builder = pipeline.load_builder(cfg.data)          # fails early on a missing data set
  if is_main:
    with files.atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  train_size = builder.info.splits[cfg.data.train_split].num_examples
  steps_per_epoch = max(train_size // cfg.batch_size, 1)
  num_steps = cfg.num_train_steps if cfg.num_train_steps > 0 else int(cfg.num_epochs * steps_per_epoch)
  tx, schedule = make_optimizer(cfg, steps_per_epoch)

  rng = jax.random.key(cfg.seed)
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, ema=cfg.optimizer.ema_decay > 0), rng)
  state_shardings = TrainState(
      step=sharding.replicated(mesh),
      params=sharding.tree_shardings(abstract.params, mesh, cfg.partition_rules),
      opt_state=sharding.tree_shardings(abstract.opt_state, mesh, cfg.partition_rules),
      ema_params=(None if abstract.ema_params is None else
                  sharding.tree_shardings(abstract.ema_params, mesh, cfg.partition_rules)),
      nonfinite=sharding.replicated(mesh), first_nonfinite=sharding.replicated(mesh))
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  resumed = _resume(ckpt_dir, resume_step, abstract, report, is_main)
  if resumed is not None:
    state, position = resumed
    step = int(jax.device_get(state.step))
    examples_seen = position["examples_seen"] if position else step * cfg.batch_size
    report(f"resumed from step {step}")
  else:
    state = jax.jit(functools.partial(init_state, model, tx, ema=cfg.optimizer.ema_decay > 0),
                    out_shardings=state_shardings)(rng)
    step, examples_seen = 0, 0

  params_sharding = {"params": state_shardings.ema_params if state_shardings.ema_params is not None
                     else state_shardings.params}
  evaluator = evaluation.Evaluator(model, cfg.data, cfg.data.eval_split, mesh, cfg.eval_batch_size,
                                   limit=cfg.num_eval_images, score=cfg.metric_score,
                                   variables_sharding=params_sharding)
  saver = _Saver(ckpt_dir, cfg, model, is_main)
  stop.reached_sync_point = saver.reached_preemption
  preempted = False
  try:
    if step >= num_steps:
      report(f"training already finished at step {step} (num_train_steps {num_steps}); "
             "evaluating the final checkpoint")
    else:
      iterator = iter(pipeline.train_dataset(cfg.data, model.scale, cfg.batch_size, cfg.seed,
                                             start=examples_seen))
      train_step = _compile_train_step(cfg, model, tx, schedule, mesh, abstract, state_shardings,
                                       report)
      state, step, preempted = _loop(cfg, train_step, iterator, mesh, state, step, num_steps,
                                     steps_per_epoch, examples_seen, evaluator, writer, saver,
                                     stop, is_main, workdir, report)
    saver.seal_saved()
  finally:
    saver.close()
  if preempted:
    report(f"preempted: saved a checkpoint at step {step}; rerun the same command to resume "
           f"(exit status {preemption.EXIT_CODE})")
    return {"preempted_at": step}

  result = evaluator({"params": inference_params(state)}, limit=-1)
  protocol = evaluate_lib.protocol(cfg.metric_score)
  skipped = int(jax.device_get(state.nonfinite))
  extra = {"step": step, "protocol": protocol, "split": cfg.data.eval_split, "data": cfg.data.name,
           "skipped_updates": skipped}
  if is_main:
    path = evaluation.write_metrics(workdir, result, extra)
    print(evaluation.format_table(result["summary"], protocol), flush=True)
    print(f"wrote {path}", flush=True)
  if skipped > cfg.max_skipped_fraction * max(step, 1):
    raise FloatingPointError(
        f"{skipped} of {step} updates were skipped as non-finite ({skipped / max(step, 1):.1%}), "
        f"more than config.max_skipped_fraction={cfg.max_skipped_fraction}: the run diverged")
  return {**result["summary"], **extra}


class _Saver:
  """Saves training steps, seals each once Orbax has finalised it, guards against saving
  after a non-finite update, and turns a full disk into one clear error."""

  def __init__(self, ckpt_dir: str, cfg: ml_collections.ConfigDict, model: SPADNet, is_main: bool):
    self.ckpt_dir, self.cfg, self.model, self.is_main = ckpt_dir, cfg, model, is_main
    self.mngr = checkpoint.manager(ckpt_dir, keep=cfg.keep_checkpoints,
                                   async_save=cfg.async_checkpoints)
    self.unsealed: list[int] = []

  def _error(self, e: Exception, step: int) -> Exception:
    if not _is_disk_full(e):
      return e
    return DiskFull(errno.ENOSPC, f"no space left on device writing checkpoint step {step} in "
                    f"{self.ckpt_dir}; earlier checkpoints are intact: free space and rerun the "
                    "same command to resume")

  def seal_saved(self) -> None:
    """Wait for in-flight saves, then write their checksums (primary process)."""
    if not self.unsealed:
      return
    try:
      self.mngr.wait_until_finished()
    except Exception as e:
      raise self._error(e, self.unsealed[-1]) from e
    if self.is_main:
      kept = set(self.mngr.all_steps())
      for s in self.unsealed:
        if s in kept:
          checkpoint.seal(self.ckpt_dir, s)
    self.unsealed.clear()

  def check_finite(self, state: TrainState, at: int) -> None:
    """Under nonfinite='stop', stop once an update was skipped, naming a good step on disk."""
    if self.cfg.nonfinite != "stop" or not int(jax.device_get(state.nonfinite)):
      return
    self.seal_saved()
    first = int(jax.device_get(state.first_nonfinite))
    last = self.mngr.latest_step()
    good = (f"last good checkpoint: step {last} in {self.ckpt_dir}" if last is not None
            else "no checkpoint was saved")
    raise FloatingPointError(
        f"non-finite loss, gradient or updated state at step {first} (config.nonfinite='stop'); "
        f"the update was not applied and training stopped at step {at}; {good}")

  def _check_space(self, state: TrainState, at: int) -> None:
    """Refuse a save the disk cannot hold (about the size of the newest step, or of the
    state before the first save), before Orbax starts writing it. The processes agree."""
    newest = checkpoint.steps(self.ckpt_dir)
    if newest:
      need = checkpoint.step_bytes(self.ckpt_dir, newest[0])
    else:
      need = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    short = shutil.disk_usage(self.ckpt_dir).free < 1.1 * need + (1 << 20)
    if jax.process_count() > 1:
      jax.block_until_ready(state)
      short = bool(multihost_utils.process_allgather(np.asarray(short)).any())
    if short:
      raise self._error(OSError(errno.ENOSPC, "No space left on device"), at)

  def save(self, state: TrainState, at: int, examples_seen: int,
           metrics: dict[str, float] | None = None) -> None:
    self.check_finite(state, at)
    if self.mngr.latest_step() == at:
      return
    self.seal_saved()
    self._check_space(state, at)
    try:
      checkpoint.save_train(self.mngr, at, self.model, inference_params(state), _train_item(state),
                            {"examples_seen": examples_seen, "batch_size": self.cfg.batch_size},
                            metrics)
    except Exception as e:
      raise self._error(e, at) from e
    self.unsealed.append(at)

  def reached_preemption(self, step: int) -> bool:
    return self.mngr.reached_preemption(step)

  def close(self) -> None:
    try:
      self.mngr.close()
    except Exception:  # pylint: disable=broad-except  # an error being raised says what failed
      pass


def _compile_train_step(cfg, model, tx, schedule, mesh, abstract, state_shardings,
                        report) -> Callable:
  batch_spec = {k: jax.ShapeDtypeStruct((cfg.batch_size, 128, 128, c), jnp.float32,
                                        sharding=sharding.batch_sharding(mesh))
                for k, c in (("hr", 3), ("lr_up", 3), ("heatmap", 5))}
  batch_spec["lr"] = jax.ShapeDtypeStruct((cfg.batch_size, 128 // model.scale, 128 // model.scale, 3),
                                          jnp.float32, sharding=sharding.batch_sharding(mesh))
  start = time.perf_counter()
  train_step = jax.jit(
      make_train_step(model, tx, schedule, cfg.heatmap_loss_weight, cfg.optimizer.ema_decay),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0).lower(abstract, batch_spec).compile()
  platform.release_host_memory()
  report(f"compiled the train step in {time.perf_counter() - start:.1f} s")
  return train_step


def _loop(cfg, train_step, iterator, mesh, state, step, num_steps, steps_per_epoch, examples_seen,
          evaluator, writer, saver: _Saver, stop: preemption.StopRequest, is_main, workdir,
          report):
  """The training steps; returns (state, step, preempted)."""
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=cfg.log_every)]
  if cfg.profile_steps > 0 and is_main:
    hooks.append(periodic_actions.Profile(num_profile_steps=cfg.profile_steps, logdir=workdir))
  train_metrics, start, start_step = None, time.perf_counter(), step
  report(f"training {num_steps} steps ({steps_per_epoch} per epoch) on {mesh.size} device(s), "
         f"mesh {dict(mesh.shape)}, from step {step}")
  with metric_writers.ensure_flushes(writer):
    while step < num_steps:
      batch = sharding.global_batch(next(iterator), mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, out = train_step(state, batch)
      step += 1
      examples_seen += cfg.batch_size
      train_metrics = out if train_metrics is None else train_metrics.merge(out)
      for hook in hooks:
        hook(step)
      if step % cfg.log_every == 0 or step == num_steps:
        saver.check_finite(state, step)
        scalars = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
        skipped = int(jax.device_get(state.nonfinite))
        scalars["train_skipped_updates"] = skipped
        writer.write_scalars(step, scalars)
        rate = (step - start_step) / (time.perf_counter() - start)
        eta = (num_steps - step) / max(rate, 1e-9)
        skip_note = f" | skipped {skipped}" if cfg.nonfinite == "skip" else ""
        report(f"step {step}/{num_steps} loss {scalars['train_loss']:.4f}{skip_note} | "
               f"{rate:.2f} steps/s | ETA {eta / 60:.1f} min")
        train_metrics = None
      evaluated = None
      if step % cfg.eval_every == 0 or step == num_steps:
        result = evaluator({"params": inference_params(state)}, keep_images=cfg.num_grid_images)
        evaluated = result["summary"]
        writer.write_scalars(step, {f"eval_{k}": v for k, v in evaluated.items()})
        if result["images"] is not None:
          writer.write_images(step, {"eval_lr_bicubic_sr_hr_heatmap":
                                     visualize.image_grid(result["images"])})
      if evaluated is not None or step % cfg.checkpoint_every == 0 or step == num_steps:
        saver.save(state, step, examples_seen,
                   None if evaluated is None else {"psnr_y": evaluated["psnr_y"]})
      if step < num_steps and stop.agreed(step, pending=state):
        saver.save(state, step, examples_seen)
        return state, step, True
  return state, step, False
