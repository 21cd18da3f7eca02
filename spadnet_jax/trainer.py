"""One training loop for every topology: jit over a Mesh, Orbax checkpoints, clu reporting.

train_and_evaluate(config, workdir) is what train.py runs. The same code runs on one CPU,
simulated CPU devices, a GPU or several hosts; only the mesh differs.
"""

import dataclasses
import errno
import functools
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import optax
from clu import metric_writers, periodic_actions
from etils import epath

from spadnet_jax import (checkpoint, config_check, config_upgrade, evaluation, losses, metrics,
                         models, preemption, process_setup, sharding, visualize)
from spadnet_jax.storage import files, locks, mirror, paths
from spadnet_jax.data import contract, pipeline, sources
from spadnet_jax.models import SCALES, SPADNet
from spadnet_jax.train_step import (TrainState, inference_params, init_state, make_optimizer,
                                    make_train_step)


def build_model(cfg: ml_collections.ConfigDict) -> SPADNet:
  """The SPADNet config.model describes, validated; ValueError names the field."""
  if cfg.model.scale not in SCALES:
    raise ValueError(f"config.model.scale must be one of {SCALES}, got {cfg.model.scale}")
  try:
    return models.from_config(cfg.model)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from e


def validate_config(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, float]:
  """Fail before any compilation, naming the offending field (the model is checked when
  built); returns the loss terms and their weights."""
  config_check.validate(cfg, num_devices)
  sources.get_source(cfg.data.name)
  return losses.weights(cfg)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
                       step: int | None = None) -> dict[str, Any]:
  """Train (resuming from workdir's newest intact checkpoint, or `step`), then evaluate.

  Returns the summary, or {'preempted_at': step} when a stop request (SIGTERM) ended
  training early. One run per workdir: a second one fails with locks.WorkdirInUse
  naming the holder. `workdir` may be an object-store URL (gs://bucket/run): everything
  the run writes goes there.
  """
  cfg = config_upgrade.upgrade_config(cfg)
  mesh = sharding.make_mesh(cfg.fsdp)
  model = build_model(cfg)
  loss_terms = validate_config(cfg, mesh.size)
  workdir = paths.resolve(workdir, "--workdir")
  with locks.workdir_lock(workdir, jax.process_index()) as lock, \
       preemption.StopRequest(cfg.preemption_sync_every) as stop:
    if lock.took_over and jax.process_index() == 0:
      print(f"took over the workdir lock of a run that stopped ({locks.describe(lock.took_over)})",
            flush=True)
    return _train(cfg, workdir, mesh, model, loss_terms, step, stop)


def state_layout(cfg: ml_collections.ConfigDict, model: SPADNet, tx: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
  """The train state as ShapeDtypeStructs carrying their shardings, and those shardings:
  parameters and optimizer state by config.partition_rules over `mesh` (any device set,
  abstract TPU devices included), counters replicated. What resume restores onto and what
  the train step compiles for."""
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, ema=cfg.optimizer.ema_decay > 0),
                            jax.random.key(cfg.seed))
  tree = lambda t: None if t is None else sharding.tree_shardings(t, mesh, cfg.partition_rules)
  shardings = TrainState(step=sharding.replicated(mesh), params=tree(abstract.params),
                         opt_state=tree(abstract.opt_state), ema_params=tree(abstract.ema_params),
                         nonfinite=sharding.replicated(mesh),
                         first_nonfinite=sharding.replicated(mesh))
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def lower_train_step(cfg: ml_collections.ConfigDict, model: SPADNet,
                     tx: optax.GradientTransformation, schedule: optax.Schedule,
                     loss_terms: dict[str, float], mesh: jax.sharding.Mesh, abstract: TrainState,
                     state_shardings: TrainState) -> jax.stages.Lowered:
  """The train step jitted over `mesh` (state donated, batch split over both mesh axes,
  FSDP parameters gathered whole for the computation) and lowered for a global batch of
  config.batch_size; .compile() gives the executable.

  Args:
    cfg: the training configuration (batch_size, optimizer.ema_decay).
    model: the SPADNet trained.
    tx, schedule: the optimizer and its learning-rate schedule (make_optimizer).
    loss_terms: registered loss terms and their weights (losses.weights).
    mesh: the devices, real or abstract (a TPU slice compiled for without one).
    abstract, state_shardings: the train state's layout (state_layout).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.jit(
      make_train_step(model, tx, schedule, loss_terms, cfg.optimizer.ema_decay,
                      sharding.gathered_params(mesh)),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0).lower(abstract, contract.batch_spec(cfg.batch_size, model.scale,
                                                            batch_sharding))


def _train(cfg: ml_collections.ConfigDict, workdir: epath.Path, mesh: jax.sharding.Mesh,
           model: SPADNet, loss_terms: dict[str, float], resume_step: int | None,
           stop: preemption.StopRequest) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  report = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
  writer = _metric_writer(workdir, is_main)

  data = pipeline.Data(cfg.data)          # prepared once here; fails early on a missing data set
  report(f"data: {cfg.data.name}" + (f" in {data.location}" if data.location else ""))
  if is_main:
    files.write_text(workdir / "config.json", cfg.to_json_best_effort(indent=2))
  train_size = data.num_examples(cfg.data.train_split)
  steps_per_epoch = max(train_size // cfg.batch_size, 1)
  num_steps = cfg.num_train_steps if cfg.num_train_steps > 0 else int(cfg.num_epochs * steps_per_epoch)
  tx, schedule = make_optimizer(cfg, steps_per_epoch)

  abstract, state_shardings = state_layout(cfg, model, tx, mesh)

  ckpt_dir = os.fspath(workdir / "checkpoints")
  resumed = checkpoint.resume(ckpt_dir, resume_step, abstract, report, is_main)
  if resumed is not None:
    state, position = resumed
    step = int(jax.device_get(state.step))
    examples_seen = position["examples_seen"] if position else step * cfg.batch_size
    report(f"resumed from step {step}")
  else:
    state = jax.jit(functools.partial(init_state, model, tx, ema=cfg.optimizer.ema_decay > 0),
                    out_shardings=state_shardings)(jax.random.key(cfg.seed))
    step, examples_seen = 0, 0

  evaluator = evaluation.Evaluator(model, data, cfg.data.eval_split, mesh, cfg.eval_batch_size,
                                   limit=cfg.num_eval_images,
                                   scoring=evaluation.Scoring(score=cfg.metric_score),
                                   variables_sharding={"params": inference_params(state_shardings)})
  saver = checkpoint.TrainSaver(ckpt_dir, model, cfg.batch_size, keep=cfg.keep_checkpoints,
                                async_save=cfg.async_checkpoints,
                                stop_on_nonfinite=cfg.nonfinite == "stop", is_main=is_main)
  stop.reached_sync_point = saver.reached_preemption
  run = _Run(cfg, workdir, mesh, num_steps, steps_per_epoch, evaluator, writer, saver, stop,
             report, is_main)
  preempted, start_step = False, step
  try:
    if step >= num_steps:
      report(f"training already finished at step {step} (num_train_steps {num_steps}); "
             "evaluating the final checkpoint")
    # A stop requested while starting or compiling is agreed on before the first step:
    # nothing new to save, and no compile or step is spent on a preempted machine.
    elif not (preempted := stop.agreed(step, pending=state, sync=True)):
      train_step = _compile_train_step(functools.partial(
          lower_train_step, cfg, model, tx, schedule, loss_terms, mesh, abstract, state_shardings),
          report)
      if not (preempted := stop.agreed(step, sync=True)):
        iterator = iter(pipeline.train_dataset(data, model.scale, cfg.batch_size, cfg.seed,
                                               start=examples_seen))
        state, step, preempted = _loop(run, train_step, iterator, state, step, examples_seen)
    saver.seal_saved()
  finally:
    saver.close()
  if preempted:
    done = (f"saved a checkpoint at step {step}" if step > start_step else
            f"stopped before training step {step + 1}, with nothing new to save")
    report(f"preempted: {done}; rerun the same command to resume "
           f"(exit status {preemption.EXIT_CODE})")
    return {"preempted_at": step}

  result = evaluator({"params": inference_params(state)}, limit=-1)
  skipped = int(jax.device_get(state.nonfinite))
  summary = evaluation.report(workdir, result, {
      "step": step, "protocol": metrics.protocol(cfg.metric_score), "split": cfg.data.eval_split,
      "data": cfg.data.name, "skipped_updates": skipped})
  writer.write_scalars(step, {f"test_{k}": v for k, v in result["summary"].items()})
  writer.write_texts(step, {"test_table": evaluation.format_table(result["summary"],
                                                                  summary["protocol"])})
  writer.flush()
  if grid_path(workdir, step).exists():
    report(f"comparison grid (LR | bicubic | SR | HR | heatmap): {grid_path(workdir, step)}")
  if skipped > cfg.max_skipped_fraction * max(step, 1):
    raise FloatingPointError(
        f"{skipped} of {step} updates were skipped as non-finite ({skipped / max(step, 1):.1%}), "
        f"more than config.max_skipped_fraction={cfg.max_skipped_fraction}: the run diverged")
  return summary


def _metric_writer(workdir: epath.Path, is_main: bool) -> metric_writers.MetricWriter:
  """clu's default writer (TensorBoard events on process 0); a full disk, which TensorFlow
  reports as ResourceExhaustedError, becomes the OSError a person reads in one line. In an
  object store the events are written locally and uploaded at each flush (mirror.py)."""
  try:
    if paths.is_url(workdir) and is_main:
      return mirror.MirroredWriter(workdir)
    return metric_writers.create_default_writer(os.fspath(workdir), just_logging=not is_main)
  except Exception as e:  # pylint: disable=broad-except  # TensorFlow's errors are no OSErrors
    if "No space left on device" in str(e):
      raise files.DiskFull(errno.ENOSPC, f"no space left on device creating the TensorBoard events "
                    f"file in {workdir}; free space and rerun the same command") from e
    raise


def grid_path(workdir: epath.Path, step: int) -> epath.Path:
  """Where the comparison grid of the validation at `step` is written."""
  return epath.Path(workdir) / "grids" / f"step_{step:06d}.png"


def _save_grid(path: epath.Path, grid: Any, report: Callable[[str], None]) -> None:
  """Write a comparison grid; a grid that cannot be written (a full disk) is reported and
  training goes on: the checkpoint that follows says what to do."""
  try:
    visualize.save_png(path, grid)
  except OSError as e:
    report(f"could not write the comparison grid {path}: {e.strerror or e}")


def validation_line(step: int, s: dict[str, float]) -> str:
  """The one line a periodic validation prints."""
  return (f"validation at step {step} ({s['num_images']} images): PSNR-Y {s['psnr_y']:.2f} dB "
          f"(bicubic {s['bicubic_psnr_y']:.2f}), SSIM-Y {s['ssim_y']:.4f} "
          f"(bicubic {s['bicubic_ssim_y']:.4f}), NME {s['nme']:.3f}")


def _compile_train_step(lower: Callable[[], jax.stages.Lowered],
                        report: Callable[[str], None]) -> Callable:
  start = time.perf_counter()
  train_step = lower().compile()
  process_setup.release_host_memory()
  report(f"compiled the train step in {time.perf_counter() - start:.1f} s")
  return train_step


def itstime(step: int, every: int, last: int) -> bool:
  """Whether `step` is due for something done every `every` steps and at the last one
  (logging, validation, checkpoints), as big_vision's utils.itstime."""
  return step % every == 0 or step == last


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the training steps need besides the state: fixed for the whole run."""
  cfg: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  num_steps: int
  steps_per_epoch: int
  evaluator: evaluation.Evaluator
  writer: metric_writers.MetricWriter
  saver: checkpoint.TrainSaver
  stop: preemption.StopRequest
  report: Callable[[str], None]
  is_main: bool


def _log_line(run: _Run, state: TrainState, step: int, train_metrics: Any, rate: float) -> None:
  """Write the training scalars of the steps since the last line and print the line."""
  run.saver.check_finite(state, step)
  scalars = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
  skipped = int(jax.device_get(state.nonfinite))
  scalars["train_skipped_updates"] = skipped
  run.writer.write_scalars(step, scalars)
  eta = (run.num_steps - step) / max(rate, 1e-9)
  skip_note = f" | skipped {skipped}" if run.cfg.nonfinite == "skip" else ""
  terms = ", ".join(f"{k[len('train_loss_'):]} {v:.4f}" for k, v in sorted(scalars.items())
                    if k.startswith("train_loss_"))
  run.report(f"step {step}/{run.num_steps} loss {scalars['train_loss']:.4f} ({terms}){skip_note} | "
             f"{rate:.2f} steps/s | ETA {eta / 60:.1f} min")


def _validate(run: _Run, state: TrainState, step: int) -> dict[str, float]:
  """A periodic validation: its line, scalars and comparison grid; returns the summary."""
  result = run.evaluator({"params": inference_params(state)}, keep_images=run.cfg.num_grid_images)
  evaluated = result["summary"]
  run.writer.write_scalars(step, {f"eval_{k}": v for k, v in evaluated.items()})
  run.report(validation_line(step, evaluated))
  if result["images"] is not None:
    grid = visualize.image_grid(result["images"])
    run.writer.write_images(step, {"eval_lr_bicubic_sr_hr_heatmap": grid})
    if run.is_main:
      _save_grid(grid_path(run.workdir, step), grid[0], run.report)
  return evaluated


def _loop(run: _Run, train_step: Callable, iterator: Iterator[dict[str, Any]], state: TrainState,
          step: int, examples_seen: int) -> tuple[TrainState, int, bool]:
  """The training steps from `step`; returns (state, step, preempted)."""
  cfg = run.cfg
  hooks = [periodic_actions.ReportProgress(num_train_steps=run.num_steps, writer=run.writer,
                                           every_steps=cfg.log_every)]
  if cfg.profile_steps > 0 and run.is_main:
    hooks.append(periodic_actions.Profile(num_profile_steps=cfg.profile_steps,
                                          logdir=os.fspath(run.workdir)))
  train_metrics, start, start_step = None, time.perf_counter(), step
  run.report(f"training {run.num_steps} steps ({run.steps_per_epoch} per epoch) on "
             f"{run.mesh.size} device(s), mesh {dict(run.mesh.shape)}, from step {step}")
  with metric_writers.ensure_flushes(run.writer):
    while step < run.num_steps:
      batch = sharding.global_batch(next(iterator), run.mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, out = train_step(state, batch)
      step += 1
      examples_seen += cfg.batch_size
      train_metrics = out if train_metrics is None else train_metrics.merge(out)
      for hook in hooks:
        hook(step)
      if itstime(step, cfg.log_every, run.num_steps):
        _log_line(run, state, step, train_metrics,
                  (step - start_step) / (time.perf_counter() - start))
        train_metrics = None
      evaluated = _validate(run, state, step) if itstime(step, cfg.eval_every, run.num_steps) else None
      if evaluated is not None or itstime(step, cfg.checkpoint_every, run.num_steps):
        run.saver.save(state, step, examples_seen,
                       None if evaluated is None else {"psnr_y": evaluated["psnr_y"]})
      if step < run.num_steps and run.stop.agreed(step, pending=state):
        run.saver.save(state, step, examples_seen)
        return state, step, True
  return state, step, False
