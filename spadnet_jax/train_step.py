"""The train step as pure functions: state, optimizer, loss and the non-finite guard.

What the training loop (trainer.py) compiles and the benchmarks time; no I/O here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics

from spadnet_jax import losses
from spadnet_jax.models import SPADNet


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  nonfinite: jax.Array          # updates skipped: loss, gradient or updated state not finite
  first_nonfinite: jax.Array    # step of the first such update, -1 if none


def train_metrics(loss_terms: Mapping[str, float]) -> type[clu_metrics.Collection]:
  """The clu metrics a train step reports: the total loss, each loss term as loss_<name>,
  the gradient norm and the learning rate."""
  return clu_metrics.Collection.create(
      loss=clu_metrics.Average.from_output("loss"),
      **{f"loss_{n}": clu_metrics.Average.from_output(f"loss_{n}") for n in loss_terms},
      grad_norm=clu_metrics.Average.from_output("grad_norm"),
      learning_rate=clu_metrics.LastValue.from_output("learning_rate"))


def make_optimizer(cfg: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
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


def make_train_step(model: SPADNet, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_terms: Mapping[str, float], ema_decay: float,
                    compute_params_sharding: Any = None) -> Callable:
  """(state, batch) -> (state, metrics), the loss being config.loss's weighted terms
  (losses.weights). The update is skipped (and counted) unless the loss, the gradient
  norm and the updated parameters' norm are finite; Adam's moments and the EMA are then
  convex combinations of finite values, so the whole new state is finite.

  Args:
    model: the SPADNet trained.
    tx: the optimizer; schedule: its learning rate per step (logged).
    loss_terms: registered loss terms and their weights.
    ema_decay: the EMA of the weights kept beside them (0: none).
    compute_params_sharding: where the parameters are while the model runs
      (sharding.gathered_params); None leaves them as stored.
  """
  metrics_cls = train_metrics(loss_terms)

  def loss_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    if compute_params_sharding is not None:
      params = jax.lax.with_sharding_constraint(params, compute_params_sharding)
    sr, hm = model.apply({"params": params}, batch["lr_up"])
    return losses.total(loss_terms, {"sr": sr, "heatmap": hm}, batch)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Any]:
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
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
    out = metrics_cls.single_from_model_output(
        loss=loss, **{f"loss_{n}": v for n, v in terms.items()}, grad_norm=grad_norm,
        learning_rate=schedule(state.step))
    return new, out

  return step


def inference_params(state: TrainState) -> Any:
  """The parameters evaluation and checkpoints serve: the EMA weights when kept."""
  return state.ema_params if state.ema_params is not None else state.params
