"""Training loss terms, registered by name and weighted by config.loss ({name: weight}).

A term is a pure function (outputs, batch) -> scalar, where outputs = {'sr', 'heatmap'}
(heatmap None without the heatmap branch) and batch follows the data contract. The
trainer logs each term with a non-zero weight as train_loss_<name>.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from spadnet_jax import config_check
from spadnet_jax.registry import Registry

LossFn = Callable[[Mapping[str, Any], Mapping[str, jax.Array]], jax.Array]
LOSSES: Registry[LossFn] = Registry("loss term")


def register(name: str) -> Callable[[LossFn], LossFn]:
  """Decorator: register fn(outputs, batch) -> scalar as loss term `name` (config.loss.<name>)."""
  return lambda fn: LOSSES.add(name, fn)


@register("sr_l1")
def sr_l1(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
  """Mean absolute error of the SR image (the paper's)."""
  return jnp.mean(jnp.abs(outputs["sr"] - batch["hr"]))


@register("heatmap_l1")
def heatmap_l1(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
  """Mean absolute error of the landmark heatmaps (the paper's); 0 without the branch."""
  if outputs["heatmap"] is None:
    return jnp.zeros(())
  return jnp.mean(jnp.abs(outputs["heatmap"] - batch["heatmap"]))


@register("heatmap_l2")
def heatmap_l2(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
  """Mean squared error of the landmark heatmaps (DIC's); 0 without the branch."""
  if outputs["heatmap"] is None:
    return jnp.zeros(())
  return jnp.mean(jnp.square(outputs["heatmap"] - batch["heatmap"]))


PEAK_WEIGHT = 20.0


@register("heatmap_peak_l2")
def heatmap_peak_l2(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
  """Squared error of the heatmaps with each pixel weighted 1 + PEAK_WEIGHT * target: the
  few pixels near a landmark count as much as the mostly-zero background, so the branch
  learns peaks early instead of sitting at the all-zero prediction. 0 without the branch."""
  if outputs["heatmap"] is None:
    return jnp.zeros(())
  target = batch["heatmap"]
  return jnp.mean((1.0 + PEAK_WEIGHT * target) * jnp.square(outputs["heatmap"] - target))


def weights(cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """The terms a training configuration uses and their weights (zero weights dropped).

  Raises ValueError naming an unknown term or a weight that is not a finite number >= 0.
  (config.heatmap_loss_weight, the field configurations had before config.loss, is folded
  into the heatmap_* weights by config_upgrade.)
  """
  out = {}
  for name, w in cfg.loss.items():
    if name not in LOSSES:
      raise ValueError(f"config.loss.{name}: no loss term named {name!r} is registered; "
                       f"registered: {sorted(LOSSES)}")
    config_check.non_negative_finite(f"loss.{name}", w)
    w = float(w)
    if w > 0:
      out[name] = w
  if not out:
    raise ValueError(f"config.loss gives every term weight 0: {dict(cfg.loss)}")
  return out


def total(term_weights: Mapping[str, float], outputs: Mapping[str, Any],
          batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the terms and each term's unweighted value."""
  terms = {name: LOSSES[name](outputs, batch) for name in term_weights}
  return sum(term_weights[n] * v for n, v in terms.items()), terms
