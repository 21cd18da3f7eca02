"""One training loop for every topology: jit over a Mesh, Orbax checkpoints, clu reporting.

train_and_evaluate(config, workdir) is what train.py runs. The same code runs on one CPU,
simulated CPU devices, a GPU or several hosts; only the mesh differs.
"""

import functools
import os
import signal
import time
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics as clu_metrics, periodic_actions
from orbax.checkpoint import checkpoint_managers as ocm

from spadnet_jax import (checkpoint, evaluate_lib, evaluation, files, platform, sharding,
                         visualize)
from spadnet_jax.data import pipeline
from spadnet_jax.models import SCALES, SPADNet


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  nonfinite: jax.Array          # updates skipped because loss or gradients were not finite
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
  for field in ("batch_size", "eval_batch_size"):
    if cfg[field] < 1 or cfg[field] % num_devices:
      raise ValueError(f"config.{field}={cfg[field]} must be a positive multiple of the "
                       f"{num_devices} devices")
  if cfg.nonfinite not in ("stop", "skip"):
    raise ValueError(f"config.nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")
  if not 0.0 <= cfg.optimizer.ema_decay < 1.0:
    raise ValueError(f"config.optimizer.ema_decay must be in [0, 1), got {cfg.optimizer.ema_decay}")
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


def make_train_step(model: SPADNet, tx: optax.GradientTransformation, schedule,
                    heatmap_weight: float, ema_decay: float):
  """(state, batch) -> (state, metrics). A non-finite loss or gradient skips the update."""

  def loss_fn(params, batch):
    sr, hm = model.apply({"params": params}, batch["lr_up"])
    loss_sr = jnp.mean(jnp.abs(sr - batch["hr"]))
    loss_hm = jnp.mean(jnp.abs(hm - batch["heatmap"])) if hm is not None else jnp.zeros(())
    return loss_sr + heatmap_weight * loss_hm, (loss_sr, loss_hm)

  def step(state: TrainState, batch):
    (loss, (loss_sr, loss_hm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
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


def _checkpoint_items(state: TrainState, model: SPADNet, iterator) -> dict[str, Any]:
  train = _train_item(state)
  return dict(model=ocp.args.JsonSave(checkpoint.model_config(model)),
              params=ocp.args.StandardSave({"params": inference_params(state)}),
              train=ocp.args.StandardSave(train),
              data=grain.checkpoint.CheckpointSave(iterator))


def _restore(mngr: ocp.CheckpointManager, step: int, abstract: TrainState, iterator) -> TrainState:
  """Restore onto the shardings carried by `abstract` (any mesh or device count)."""
  train = _train_item(abstract)
  inference = abstract.ema_params if abstract.ema_params is not None else abstract.params
  r = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore({"params": inference}),
      train=ocp.args.StandardRestore(train),
      data=grain.checkpoint.CheckpointRestore(iterator)))
  t = r["train"]
  if abstract.ema_params is not None:
    return TrainState(t["step"], t["params"], t["opt_state"], r["params"]["params"],
                      t["nonfinite"], t["first_nonfinite"])
  return TrainState(t["step"], r["params"]["params"], t["opt_state"], None, t["nonfinite"],
                    t["first_nonfinite"])


def checkpoint_manager(directory: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keep the last `keep_checkpoints` plus the best by validation PSNR (Y)."""
  policy = ocm.AnyPreservationPolicy([
      ocm.LatestN(n=cfg.keep_checkpoints),
      ocm.BestN(get_metric_fn=lambda m: m["psnr_y"], reverse=False, n=1,   # highest wins
                keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           enable_async_checkpointing=cfg.async_checkpoints),
      item_handlers={"model": ocp.JsonCheckpointHandler(),
                     "params": ocp.StandardCheckpointHandler(),
                     "train": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:          # not the main thread: rely on Orbax's preemption sync only
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (resuming from workdir's latest checkpoint), then evaluate; returns the summary."""
  mesh = sharding.make_mesh(cfg.fsdp)
  validate_config(cfg, mesh.size)
  model = build_model(cfg)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
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

  iterator = iter(pipeline.train_dataset(cfg.data, model.scale, cfg.batch_size, cfg.seed))
  mngr = checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg)
  latest = mngr.latest_step()
  if latest is not None:
    state = _restore(mngr, latest, abstract, iterator)
    logging.info("resumed from %s at step %d", mngr.directory, latest)
    print(f"resumed from step {latest}", flush=True)
  else:
    state = jax.jit(functools.partial(init_state, model, tx, ema=cfg.optimizer.ema_decay > 0),
                    out_shardings=state_shardings)(rng)

  batch_spec = {k: jax.ShapeDtypeStruct((cfg.batch_size, 128, 128, c), jnp.float32,
                                        sharding=sharding.batch_sharding(mesh))
                for k, c in (("hr", 3), ("lr_up", 3), ("heatmap", 5))}
  batch_spec["lr"] = jax.ShapeDtypeStruct((cfg.batch_size, 128 // model.scale, 128 // model.scale, 3),
                                          jnp.float32, sharding=sharding.batch_sharding(mesh))
  compile_start = time.perf_counter()
  train_step = jax.jit(
      make_train_step(model, tx, schedule, cfg.heatmap_loss_weight, cfg.optimizer.ema_decay),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0).lower(abstract, batch_spec).compile()
  platform.release_host_memory()
  print(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s", flush=True)
  params_sharding = {"params": state_shardings.ema_params if state_shardings.ema_params is not None
                     else state_shardings.params}
  evaluator = evaluation.Evaluator(model, cfg.data, cfg.data.eval_split, mesh, cfg.eval_batch_size,
                                   limit=cfg.num_eval_images, score=cfg.metric_score,
                                   variables_sharding=params_sharding)

  def check_finite(step: int) -> None:
    bad = int(jax.device_get(state.nonfinite))
    if bad and cfg.nonfinite == "stop":
      first = int(jax.device_get(state.first_nonfinite))
      raise FloatingPointError(
          f"non-finite loss or gradient at step {first} (config.nonfinite='stop'); the update "
          f"was not applied and training stopped at step {step}. Last good checkpoint: "
          f"{mngr.latest_step()} in {mngr.directory}")

  def save(step: int, metrics: dict[str, float] | None = None) -> None:
    check_finite(step)
    if mngr.latest_step() == step:
      return
    mngr.save(step, args=ocp.args.Composite(**_checkpoint_items(state, model, iterator)),
              metrics=metrics, force=True)

  step = int(jax.device_get(state.step))
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=cfg.log_every)]
  if cfg.profile_steps > 0 and is_main:
    hooks.append(periodic_actions.Profile(num_profile_steps=cfg.profile_steps, logdir=workdir))
  train_metrics, start, start_step = None, time.perf_counter(), step
  print(f"training {num_steps} steps ({steps_per_epoch} per epoch) on {mesh.size} device(s), "
        f"mesh {dict(mesh.shape)}, from step {step}", flush=True)
  with _Preemption() as preemption, metric_writers.ensure_flushes(writer):
    while step < num_steps:
      batch = sharding.global_batch(next(iterator), mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, out = train_step(state, batch)
      step += 1
      train_metrics = out if train_metrics is None else train_metrics.merge(out)
      for hook in hooks:
        hook(step)
      if step % cfg.log_every == 0 or step == num_steps:
        check_finite(step)
        scalars = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
        scalars["train_skipped_updates"] = int(jax.device_get(state.nonfinite))
        writer.write_scalars(step, scalars)
        rate = (step - start_step) / (time.perf_counter() - start)
        eta = (num_steps - step) / max(rate, 1e-9)
        print(f"step {step}/{num_steps} loss {scalars['train_loss']:.4f} | {rate:.2f} steps/s | "
              f"ETA {eta / 60:.1f} min", flush=True)
        train_metrics = None
      evaluated = None
      if step % cfg.eval_every == 0 or step == num_steps:
        result = evaluator({"params": inference_params(state)}, keep_images=cfg.num_grid_images)
        evaluated = result["summary"]
        writer.write_scalars(step, {f"eval_{k}": v for k, v in evaluated.items()})
        if result["images"] is not None:
          writer.write_images(step, {"eval_lr_bicubic_sr_hr_heatmap": visualize.image_grid(result["images"])})
      if evaluated is not None or step % cfg.checkpoint_every == 0 or step == num_steps:
        save(step, None if evaluated is None else {"psnr_y": evaluated["psnr_y"]})
      if preemption.requested or mngr.reached_preemption(step):
        save(step)
        mngr.wait_until_finished()
        print(f"preempted: saved a checkpoint at step {step}; rerun the same command to resume",
              flush=True)
        mngr.close()
        return {"preempted_at": step}
  mngr.wait_until_finished()
  mngr.close()

  result = evaluator({"params": inference_params(state)}, limit=-1)
  protocol = evaluate_lib.protocol(cfg.metric_score)
  extra = {"step": step, "protocol": protocol, "split": cfg.data.eval_split, "data": cfg.data.name}
  if is_main:
    path = evaluation.write_metrics(workdir, result, extra)
    print(evaluation.format_table(result["summary"], protocol), flush=True)
    print(f"wrote {path}", flush=True)
  return {**result["summary"], **extra}
