"""GSAC gate placement against an emulation of the official repeat + reshape."""
import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import ops


@pytest.mark.parametrize("hw,c", [((4, 4), 8), ((3, 5), 4), ((8, 8), 64)])
def test_official_gate_map_emulates_repeat_reshape(rng, hw, c):
  h, w = hw
  g = rng.random((2, c)).astype(np.float32)
  # The official code: (b, 1, C) repeated to (b, h*w, C), reshaped to NCHW (b, C, h, w).
  nchw = np.repeat(g[:, None, :], h * w, axis=1).reshape(2, c, h, w)
  ours = np.asarray(ops.gate_map(jnp.asarray(g), h, w, "official"))
  np.testing.assert_array_equal(ours, nchw.transpose(0, 2, 3, 1))


def test_official_is_not_per_channel(rng):
  g = rng.random((1, 8)).astype(np.float32)
  official = np.asarray(ops.gate_map(jnp.asarray(g), 4, 4, "official"))
  assert official[0, 0, 1, 0] == g[0, 1]          # position (0, 1) of channel 0 gets g[1]
  channel = np.asarray(ops.gate_map(jnp.asarray(g), 4, 4, "channel"))
  np.testing.assert_array_equal(channel[0, 2, 3], g[0])


def test_gate_map_rejects_unknown_mode():
  with pytest.raises(ValueError, match="unknown GSAC gate mode 'spatial'"):
    ops.gate_map(jnp.ones((1, 4)), 2, 2, "spatial")
