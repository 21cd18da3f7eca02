"""The functions the benchmarks time: the trainer's own train step and the model's forward
pass, at paper size, on a batch of the data contract's shapes."""
from __future__ import annotations

from typing import Any, Callable


def paper_config():
  """The paper's x8 training recipe (configs/celeba_x8.py)."""
  from configs import celeba_x8  # pylint: disable=import-outside-toplevel
  return celeba_x8.get_config()


def step_fn(model, kind: str, for_counting: bool = False) -> Callable:
  """kind 'train': train_step.make_train_step with the paper's optimizer and loss terms,
  (state, batch) -> (state, metrics); 'inference': (params, batch) -> (sr, heatmap), a few
  images at a time on a CPU as evaluation and predict run it (models.batching), or with
  `for_counting` the whole batch at once: XLA's cost analysis counts a loop's body once."""
  from spadnet_jax import losses, train_step  # pylint: disable=import-outside-toplevel
  from spadnet_jax.models import batching  # pylint: disable=import-outside-toplevel
  if kind == "inference":
    apply = lambda params, x: model.apply({"params": params}, x)
    run = apply if for_counting else batching.in_steps(apply, per_step=batching.images_per_step(model))
    return lambda params, batch: run(params, batch["lr_up"])
  cfg = paper_config()
  tx, schedule = train_step.make_optimizer(cfg, steps_per_epoch=10_000)
  return train_step.make_train_step(model, tx, schedule, losses.weights(cfg), cfg.optimizer.ema_decay)


def step_args(model, kind: str, batch: int) -> list[Any]:
  """[state, batch] for 'train', [params, batch] for 'inference'."""
  import jax  # pylint: disable=import-outside-toplevel

  from spadnet_jax import train_step  # pylint: disable=import-outside-toplevel
  from spadnet_jax.data import contract  # pylint: disable=import-outside-toplevel
  data = jax.device_put(contract.random_batch(batch, model.scale))
  if kind == "inference":
    return [jax.device_put(host_params(model)), data]
  cfg = paper_config()
  tx, _ = train_step.make_optimizer(cfg, steps_per_epoch=10_000)
  state = jax.jit(lambda rng: train_step.init_state(model, tx, rng, ema=False))(jax.random.key(2))
  return [state, data]


def host_params(model) -> Any:
  """Parameters of the model's shapes drawn on the host (normal, scaled by 1/sqrt(fan-in)),
  as an inference process gets them from a checkpoint: without compiling model.init, whose
  compilation would otherwise count in the process's peak memory."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  shapes = jax.eval_shape(model.init, jax.random.key(2), model.example_input())["params"]

  def draw(spec: Any) -> np.ndarray:
    fan_in = int(np.prod(spec.shape[:-1])) or 1
    return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(spec.dtype)
  return jax.tree_util.tree_map(draw, shapes)
