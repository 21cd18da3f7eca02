"""GSAC (global structure-aware convolution) gate placement as pure functions.

The gate `g` (N, C) comes from globally pooled heatmap features. The official code does
not broadcast it per channel: it repeats g over H*W positions and reshapes (N, H*W, C)
to (N, C, H, W), so NCHW element [c, y, x] receives g[(c*H*W + y*W + x) mod C]
(= g[(y*W + x) mod C] whenever C divides H*W, as at every SPADNet resolution).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def official_gate_index(height: int, width: int, channels: int) -> np.ndarray:
  """(H, W, C) int array: which gate entry lands on NHWC position [y, x, c] officially."""
  c = np.arange(channels)[None, None, :]
  y = np.arange(height)[:, None, None]
  x = np.arange(width)[None, :, None]
  return (c * height * width + y * width + x) % channels


def gate_map(g: jnp.ndarray, height: int, width: int, mode: str = "official") -> jnp.ndarray:
  """Spread the gate g (N, C) over a (N, H, W, C) map.

  mode='official' reproduces the official repeat+reshape layout; 'channel' is the
  per-channel broadcast the paper describes (g[c] at every position of channel c).
  """
  n, c = g.shape
  if mode == "official" and (height * width) % c == 0:
    # Every SPADNet resolution: entry [y, x] is g[(y*W + x) mod C] for all channels, a tiled
    # (N, H, W, 1) map that fuses into its consumer (no gather, no scatter in the gradient).
    tiled = jnp.tile(g, (1, height * width // c)).reshape(n, height, width, 1)
    return jnp.broadcast_to(tiled, (n, height, width, c))
  if mode == "official":
    return jnp.take(g, jnp.asarray(official_gate_index(height, width, c)), axis=1)
  if mode == "channel":
    return jnp.broadcast_to(g[:, None, None, :], (n, height, width, c))
  raise ValueError(f"unknown GSAC gate mode {mode!r}: use 'official' or 'channel'")
