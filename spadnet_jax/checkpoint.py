"""Orbax checkpoints: the whole layout, save and restore for training and inference.

Layout (an Orbax CheckpointManager directory): each step holds the items
  'model'    - JSON: the SPADNet fields, so the checkpoint alone rebuilds the model;
  'params'   - the model variables used for inference (EMA weights when training keeps them);
  'train'    - optimizer state and counters (training runs only);
  'position' - JSON: examples of the training sequence consumed (training runs only);
and checksums.json, the SHA-256 of every file of the step, written once Orbax has
finalised it. Every restore verifies those checksums: a damaged step is named by step
and file and never trusted. The directory may be on a disk or in an object store (gs://:
Orbax and TensorStore write there natively; on GCS Orbax marks a finalised step with
commit_success.txt in place of a rename). eval.py, predict and the converter read 'model'
and 'params'.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from spadnet_jax import models, train_step
from spadnet_jax.storage import files, paths
from spadnet_jax.models import SPADNet
from spadnet_jax.storage.checksums import (CHECKSUMS, DamagedCheckpoint, is_sealed,  # noqa: F401
                                           problems, seal, step_bytes, step_folder,
                                           step_of_folder, verify)

Report = Callable[[str], None]

MAX_PARAMETERS = 1_000_000_000   # 4 GB of float32; the paper's model has 7.6 million


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"model": ocp.JsonCheckpointHandler(), "params": ocp.StandardCheckpointHandler(),
          "train": ocp.StandardCheckpointHandler(), "position": ocp.JsonCheckpointHandler()}


def manager(directory: str | os.PathLike[str], keep: int | None = None, async_save: bool = False,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The CheckpointManager of this layout. With `keep`, training's retention: the last
  `keep` steps plus the best by validation PSNR (Y)."""
  policy = None
  if keep is not None:
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: m["psnr_y"], reverse=False, n=1,   # highest wins
                  keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManager(
      paths.location(directory),
      options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=async_save),
      item_handlers=_handlers())


# --- integrity (storage/checksums.py) -----------------------------------------------------

def _is_dir(directory: str | os.PathLike[str]) -> bool:
  return paths.location(directory).is_dir()


def seal_finalized(directory: str) -> list[int]:
  """Seal every finalised step that has no checksums yet (a run stopped between Orbax's
  finalisation and sealing); returns those steps."""
  if not _is_dir(directory):
    return []
  done = []
  for step in sorted(ocp.utils.checkpoint_steps(paths.location(directory))):
    if not is_sealed(directory, step):
      seal(directory, step)
      done.append(step)
  return done


def steps(directory: str) -> list[int]:
  """The finalised steps under a manager directory, newest first."""
  if not _is_dir(directory):
    return []
  return sorted(ocp.utils.checkpoint_steps(paths.location(directory)), reverse=True)


def restore_newest_intact(directory: str, step: int | None, restore: Callable[[int], Any],
                          report: Callable[[str], None] = print) -> tuple[int, Any]:
  """Verify and restore `step`, or the newest step that verifies and restores.

  An explicit `step` that is missing or damaged fails with DamagedCheckpoint /
  FileNotFoundError; otherwise each damaged step is reported and the next older one
  tried. `restore(step)` may raise DamagedCheckpoint itself (e.g. non-finite values).
  """
  available = steps(directory)
  if step is not None:
    if step not in available:
      raise FileNotFoundError(f"{directory} has no step {step}; it has {sorted(available)}")
    candidates = [step]
  else:
    candidates = available
  if not candidates:
    raise FileNotFoundError(f"{directory} holds no checkpoint steps")
  errors = []
  for i, s in enumerate(candidates):
    try:
      if not verify(directory, s):
        report(f"checkpoint step {s} has no checksums (written before they were kept); "
               "not verified")
      return s, _restore_or_damaged(directory, s, restore)
    except DamagedCheckpoint as e:
      if len(candidates) == 1:
        raise
      errors.append(str(e))
      if i + 1 < len(candidates):
        report(f"{e}; trying the previous step")
  raise DamagedCheckpoint(f"every checkpoint step in {directory} is damaged: " + "; ".join(errors))


def _restore_or_damaged(directory: str, step: int, restore: Callable[[int], Any]) -> Any:
  try:
    return restore(step)
  except DamagedCheckpoint:
    raise
  except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DamagedCheckpoint(f"checkpoint step {step} in {directory} cannot be restored "
                            f"({first[:300]})") from e


def check_finite(tree: Any, where: str) -> None:
  """DamagedCheckpoint naming the first non-finite leaf of a restored tree."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(jax.device_get(leaf)) if getattr(leaf, "is_fully_addressable", True) else None
    if a is not None and a.dtype.kind == "f" and not np.isfinite(a).all():
      raise DamagedCheckpoint(f"{where}: {jax.tree_util.keystr(path)} holds non-finite values")


# --- training ------------------------------------------------------------------------------

def _train_item(state: Any) -> dict[str, Any]:
  """The 'train' item of a train_step.TrainState: what resuming needs beyond the inference
  params (and the raw params too when EMA weights are the inference ones). Works on
  abstract states too."""
  train = {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite,
           "first_nonfinite": state.first_nonfinite}
  if state.ema_params is not None:
    train["params"] = state.params
  return train


def save_train(mngr: ocp.CheckpointManager, step: int, model: SPADNet, state: Any,
               position: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
  """Start saving a training state (asynchronously where the manager is async).

  Args:
    mngr: the run's manager (manager(), with training's retention).
    step: the step saved.
    model: written as the 'model' item, so the checkpoint alone rebuilds it.
    state: the train_step.TrainState.
    position: examples of the training sequence consumed, and the batch size.
    metrics: validation metrics ('psnr_y') for keep-best, or None.
  """
  mngr.save(step, args=ocp.args.Composite(
      model=ocp.args.JsonSave(models.to_config(model)),
      params=ocp.args.StandardSave({"params": train_step.inference_params(state)}),
      train=ocp.args.StandardSave(_train_item(state)),
      position=ocp.args.JsonSave(position)), metrics=metrics, force=True)


def restore_train(mngr: ocp.CheckpointManager, step: int,
                  abstract: Any) -> tuple[Any, dict[str, Any] | None]:
  """Restore a training state onto the shardings carried by the abstract state (any mesh,
  device or process count). The position is None for steps written before it was kept."""
  args = dict(params=ocp.args.StandardRestore({"params": train_step.inference_params(abstract)}),
              train=ocp.args.StandardRestore(_train_item(abstract)))
  has_position = (paths.location(step_folder(mngr.directory, step)) / "position").is_dir()
  if has_position:
    args["position"] = ocp.args.JsonRestore()
  r = mngr.restore(step, args=ocp.args.Composite(**args))
  t, inference = r["train"], r["params"]["params"]
  state = abstract.replace(step=t["step"], opt_state=t["opt_state"], nonfinite=t["nonfinite"],
                           first_nonfinite=t["first_nonfinite"])
  if abstract.ema_params is None:
    state = state.replace(params=inference)
  else:
    state = state.replace(params=t["params"], ema_params=inference)
  return state, (dict(r["position"]) if has_position else None)


def read_items(directory: str, step: int, items: tuple[str, ...] = ("params", "train")) -> dict[str, Any]:
  """The raw trees of some items of one step, as NumPy arrays (inspection and tests)."""
  restore = {"model": ocp.args.JsonRestore, "position": ocp.args.JsonRestore}
  with manager(directory, read_only=True) as mngr:
    return dict(mngr.restore(step, args=ocp.args.Composite(
        **{name: restore.get(name, ocp.args.StandardRestore)() for name in items})))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _set_aside_newer(directory: str, restored: int, report: Report) -> None:
  """Move the steps newer than `restored` to <workdir>/checkpoints.set_aside/ (never delete)."""
  aside = paths.location(directory).parent / "checkpoints.set_aside"
  for s in [s for s in steps(directory) if s > restored]:
    aside.mkdir(parents=True, exist_ok=True)
    target = aside / str(s)
    if target.exists():
      target = aside / f"{s}.{int(time.time())}"
    paths.move(step_folder(directory, s), target)
    report(f"moved checkpoint step {s} to {target}: training goes on from step {restored}")


def resume(directory: str, step: int | None, abstract: Any, report: Report,
           is_main: bool) -> tuple[Any, dict[str, Any] | None] | None:
  """Restore the newest intact training step (or `step`): verified checksums, finite values.

  Steps newer than the one restored (damaged ones, or all newer ones when `step` is
  given) are moved to checkpoints.set_aside/ so that training can go on from it; nothing
  is deleted. Returns (state, position), or None when there is nothing to resume.

  Args:
    directory: the run's checkpoints folder.
    step: the step asked for (--step), or None for the newest intact one.
    abstract: the train state's layout (ShapeDtypeStructs with the new shardings).
    report: prints a line (the primary process's printer).
    is_main: whether this process seals, and sets steps aside, for all.
  """
  if is_main:
    for s in seal_finalized(directory):
      report(f"checkpoint step {s} was finalised but not sealed when its run stopped; sealed it")
  _sync("spadnet_sealed")
  if not steps(directory):
    if step is not None:
      raise FileNotFoundError(f"{directory} holds no checkpoint steps to resume step {step} from")
    return None

  def restore(s: int) -> tuple[Any, dict[str, Any] | None]:
    with manager(directory, read_only=True) as mngr:
      state, position = restore_train(mngr, s, abstract)
    if not bool(jax.device_get(jax.jit(train_step.all_finite)(state))):
      raise DamagedCheckpoint(f"checkpoint step {s} in {directory} holds non-finite values")
    return state, position

  restored, result = restore_newest_intact(directory, step, restore, report)
  if is_main:
    _set_aside_newer(directory, restored, report)
  _sync("spadnet_set_aside")
  return result


def _is_disk_full(e: BaseException | None) -> bool:
  while e is not None:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


class TrainSaver:
  """Saves training steps, seals each once Orbax has finalised it, refuses to save after a
  non-finite update under nonfinite='stop', and turns a full disk into one clear error."""

  def __init__(self, directory: str, model: SPADNet, batch_size: int, keep: int,
               async_save: bool, stop_on_nonfinite: bool, is_main: bool):
    self.directory, self.model, self.batch_size, self.is_main = directory, model, batch_size, is_main
    self.stop_on_nonfinite = stop_on_nonfinite
    self.mngr = manager(directory, keep=keep, async_save=async_save)
    self.unsealed: list[int] = []

  def _error(self, e: Exception, step: int) -> Exception:
    if not _is_disk_full(e):
      return e
    return files.DiskFull(errno.ENOSPC, f"no space left on device writing checkpoint step {step} in "
                    f"{self.directory}; earlier checkpoints are intact: free space and rerun the "
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
          seal(self.directory, s)
    self.unsealed.clear()

  def check_finite(self, state: Any, at: int) -> None:
    """Under nonfinite='stop', stop once an update was skipped, naming a good step on disk."""
    if not self.stop_on_nonfinite or not int(jax.device_get(state.nonfinite)):
      return
    self.seal_saved()
    first = int(jax.device_get(state.first_nonfinite))
    last = self.mngr.latest_step()
    good = (f"last good checkpoint: step {last} in {self.directory}" if last is not None
            else "no checkpoint was saved")
    raise FloatingPointError(
        f"non-finite loss, gradient or updated state at step {first} (config.nonfinite='stop'); "
        f"the update was not applied and training stopped at step {at}; {good}")

  def _check_space(self, state: Any, at: int) -> None:
    """Refuse a save the disk cannot hold (about the size of the newest step, or of the
    state before the first save), before Orbax starts writing it. The processes agree."""
    if paths.is_url(self.directory):       # an object store has no fixed capacity
      return
    newest = steps(self.directory)
    need = (step_bytes(self.directory, newest[0]) if newest
            else sum(x.nbytes for x in jax.tree_util.tree_leaves(state)))
    short = shutil.disk_usage(self.directory).free < 1.1 * need + (1 << 20)
    if jax.process_count() > 1:
      jax.block_until_ready(state)
      short = bool(multihost_utils.process_allgather(np.asarray(short)).any())
    if short:
      raise self._error(OSError(errno.ENOSPC, "No space left on device"), at)

  def save(self, state: Any, at: int, examples_seen: int,
           metrics: dict[str, float] | None = None) -> None:
    self.check_finite(state, at)
    if self.mngr.latest_step() == at:
      return
    self.seal_saved()
    self._check_space(state, at)
    try:
      save_train(self.mngr, at, self.model, state,
                 {"examples_seen": examples_seen, "batch_size": self.batch_size}, metrics)
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


# --- inference -----------------------------------------------------------------------------

def save_inference_checkpoint(directory: str, model: SPADNet, variables: Any, step: int = 0) -> str:
  """Write `variables` and the model configuration as step `step` under `directory`.

  Refuses to replace an existing step (nothing already written is ever lost); Orbax
  writes to a temporary folder and renames it, so a crash leaves no half checkpoint.
  """
  directory = paths.absolute(directory)
  with manager(directory) as mngr:
    if step in mngr.all_steps():
      raise FileExistsError(f"{directory} already holds a checkpoint at step {step}; "
                            "choose another directory")
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.JsonSave(models.to_config(model)),
        params=ocp.args.StandardSave(variables)))
    mngr.wait_until_finished()
  seal(directory, step)
  return step_folder(directory, step)


def _manager_dir_and_step(path: str, step: int | None) -> tuple[str, int | None]:
  """Accept a CheckpointManager directory (step given or None for the newest intact) or
  one step folder."""
  path = paths.absolute(path)
  if not _is_dir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  one_step = step_of_folder(path)
  if step is None and one_step:
    return one_step
  if not steps(path):
    raise FileNotFoundError(f"{path} holds no checkpoint steps (expected folders named by step "
                            "with 'model' and 'params' inside)")
  return path, step


def _read_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  where = f"{mngr.directory}/{step}/model"
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
  except Exception as e:
    raise DamagedCheckpoint(f"checkpoint {where} (the model configuration) is corrupt or "
                            f"unreadable: {e}") from e
  if not isinstance(restored["model"], dict):
    raise DamagedCheckpoint(f"checkpoint {where} holds no model configuration")
  return dict(restored["model"])


def read_model_config(path: str, step: int | None = None,
                      report: Callable[[str], None] = print) -> tuple[dict[str, Any], int]:
  """The JSON model configuration stored with a checkpoint (newest intact step unless
  `step`), and its step."""
  directory, step = _manager_dir_and_step(path, step)
  with manager(directory, read_only=True) as mngr:
    step, cfg = restore_newest_intact(directory, step, lambda s: _read_config(mngr, s), report)
  return cfg, step


def load_model(path: str, step: int | None = None, shardings: Any = None,
               report: Callable[[str], None] = print,
               **overrides: Any) -> tuple[SPADNet, Any, int]:
  """Rebuild the model and restore its variables from a checkpoint.

  The step's checksums are verified; a damaged newest step is reported through `report`
  and the previous one used, an explicit damaged step fails (DamagedCheckpoint). The
  stored model configuration is checked against the stored parameters before anything is
  traced; parameters whose shapes differ from what it implies are reported by name.

  Args:
    path: a manager directory (the newest intact step, or `step`) or one step folder.
    step: the step to load, or None.
    shardings: a pytree of jax.sharding.Sharding, or one for all leaves, placing the
      restored arrays (default: the first device).
    report: prints what was skipped (a damaged newest step).
    **overrides: fields that do not alter parameters (e.g. pac_impl, dtype).
  """
  directory, step = _manager_dir_and_step(path, step)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def restore(s: int) -> tuple[SPADNet, Any]:
    where = f"{step_folder(directory, s)}/params"
    model = models.from_config(_read_config(mngr, s), **overrides)
    meta = mngr.item_metadata(s)["params"]
    if meta is None:
      raise DamagedCheckpoint(f"checkpoint {where} is corrupt or unreadable: no parameter metadata")
    check_structure(model, meta, where)        # before tracing a configuration from a file
    abstract = abstract_variables(model)
    if isinstance(shardings, jax.sharding.Sharding):
      abstract = jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)
    else:
      abstract = jax.tree_util.tree_map(
          lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    check_tree_matches(abstract, meta, where)
    restored = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    check_finite(restored["params"], f"checkpoint {where}")
    return model, restored["params"]

  with manager(directory, read_only=True) as mngr:
    step, (model, variables) = restore_newest_intact(directory, step, restore, report)
  return model, variables, step


def abstract_variables(model: SPADNet) -> Any:
  """Shapes and dtypes of the model's variables, computed without allocating them."""
  return jax.eval_shape(model.init, jax.random.key(0), model.example_input())


def check_structure(model: SPADNet, stored: Any, where: str) -> None:
  """ValueError when the stored variables' top-level modules are not the ones `model`'s
  configuration builds (block counts, branches), or their declared sizes exceed
  MAX_PARAMETERS: checked from metadata alone, before the configuration is traced or any
  array allocated, since both come from a file anyone may edit."""
  params = stored.get("params") if hasattr(stored, "get") else None
  if not hasattr(params, "keys"):
    raise ValueError(f"checkpoint {where} holds no 'params' collection")
  expected, found = model.submodule_names(), {str(k) for k in params.keys()}
  if expected != found:
    missing, extra = sorted(expected - found), sorted(found - expected)
    raise ValueError(
        f"checkpoint {where} does not match its model configuration (scale {model.scale}, "
        f"number {model.number}, hab_num {model.num_habs}, heatmap_branch "
        f"{model.heatmap_branch}): {len(missing)} modules missing {missing[:3]}, "
        f"{len(extra)} unexpected {extra[:3]}")
  declared = 0
  for _, leaf in jax.tree_util.tree_leaves_with_path(params):
    shape = tuple(getattr(leaf, "shape", None) or ())
    if not all(isinstance(n, int) and n >= 0 for n in shape):
      raise ValueError(f"checkpoint {where} declares a parameter of shape {shape}")
    declared += int(np.prod(shape, dtype=np.float64))
  if declared > MAX_PARAMETERS:
    raise ValueError(f"checkpoint {where} declares {declared:,.0f} parameters, over the "
                     f"{MAX_PARAMETERS:,} a SPADNet may have here")


def check_tree_matches(expected: Any, found: Any, where: str) -> None:
  """Raise ValueError naming the first missing, unexpected or mis-shaped parameter."""
  exp = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(found)}
  missing = sorted(set(exp) - set(got))
  extra = sorted(set(got) - set(exp))
  if missing or extra:
    raise ValueError(f"checkpoint {where} does not match the model configuration: "
                     f"missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                     f"unexpected parameters {extra[:5]}{'...' if len(extra) > 5 else ''}")
  for key, e in exp.items():
    shape = tuple(getattr(got[key], "shape", ()))
    if shape != tuple(e.shape):
      raise ValueError(f"checkpoint {where}: parameter {key} has shape {shape}, the model "
                       f"configuration needs {tuple(e.shape)}")
