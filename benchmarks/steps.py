"""The functions the benchmarks time: the trainer's own train step and the model's forward
pass, at paper size, on a batch of the data contract's shapes."""
from __future__ import annotations

from typing import Any, Callable


def paper_config():
  """The paper's x8 training recipe (configs/celeba_x8.py)."""
  from configs import celeba_x8  # pylint: disable=import-outside-toplevel
  return celeba_x8.get_config()


def step_fn(model, kind: str) -> Callable:
  """kind 'train': train_step.make_train_step with the paper's optimizer and loss terms,
  (state, batch) -> (state, metrics); 'inference': (params, batch) -> (sr, heatmap)."""
  from spadnet_jax import losses, train_step  # pylint: disable=import-outside-toplevel
  if kind == "inference":
    return lambda params, batch: model.apply({"params": params}, batch["lr_up"])
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
    return [jax.jit(model.init)(jax.random.key(2), model.example_input())["params"], data]
  cfg = paper_config()
  tx, _ = train_step.make_optimizer(cfg, steps_per_epoch=10_000)
  state = jax.jit(lambda rng: train_step.init_state(model, tx, rng, ema=False))(jax.random.key(2))
  return [state, data]
