"""SPADNet: an SR branch steered, block by block, by a landmark-heatmap branch."""
from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spadnet_jax import ops
from spadnet_jax.models.layers import HAB, RCAB, HabOptions, Upsample2x, conv3x3
from spadnet_jax.models.remat import remat_call

SCALES = (4, 8, 16)
NUM_HEATMAPS = 5
REMAT = ("none", "rcab", "all")
# Upper bounds on the sizes a configuration may ask for: sixteen times the paper's (64
# features, 6 blocks), past any model a 16x16 face needs. A configuration read from a file
# (a checkpoint's, a converter's) is checked against them before anything is traced, so an
# edited `number: 1000000` is one line, not minutes of tracing.
MAX_FEATS = 1024
MAX_BLOCKS = 96


class SPADNet(nn.Module):
  """Face SR network. Input: bicubic-upsampled LR faces (N, H, W, 3) in [0, 1].

  Returns (sr (N, H, W, 3), heatmap (N, H, W, 5)); heatmap is None when
  `heatmap_branch=False`. Defaults are the paper's configuration and the official
  code's arithmetic; every other value is a research variant.

  Attributes:
    scale: 4, 8 or 16; the network has log2(scale) stages.
    n_feats: feature channels.
    number: residual blocks (RCAB) per stage and branch.
    hab_num: heatmap attention blocks per stage (default number - 1, official); HAB i
      follows RCAB i.
    pac_kernel: a registered PAC kernel (ops.KERNELS): 'gaussian' (official) or 'inverse'
      (PAC paper's inverse-distance kernel), or one a researcher registers.
    pac_impl: a registered PAC formulation (ops.PAC_IMPLS); 'auto' (default) picks per
      platform, 'einsum' is the straightforward reference. Same outputs, other speed.
    conv_impl: a registered formulation of the plain 3x3 convolutions (ops.CONV_IMPLS):
      'winograd' (default), F(2x2, 3x3) forward passes on XLA:CPU where they pay and XLA's
      convolution elsewhere (ops.conv); 'xla', XLA's convolution everywhere (smaller
      program: a little faster to compile). Same function, float32 round-off apart.
    gsac_gate: 'official' (repeat+reshape layout) or 'channel' (per-channel broadcast).
    use_lsac, use_gsac: ablate either dynamic path of every HAB.
    heatmap_branch: without it, HABs are guided by the SR features themselves and no
      heatmap is predicted.
    remat: which blocks recompute their forward pass during the backward pass instead of
      keeping activations (models/remat.py): 'none' (default), 'rcab' (the residual
      blocks) or 'all' (RCABs and HABs).
    dtype: computation dtype (parameters stay float32).
  """
  scale: int = 8
  n_feats: int = 64
  number: int = 6
  hab_num: int | None = None
  reduction: int = 16
  pac_kernel: str = "gaussian"
  pac_impl: str = "auto"
  conv_impl: str = "winograd"
  gsac_gate: str = "official"
  use_lsac: bool = True
  use_gsac: bool = True
  heatmap_branch: bool = True
  remat: str = "none"
  dtype: Any = jnp.float32

  def example_input(self, batch: int = 1) -> jnp.ndarray:
    """The smallest input with every parameter's shape: init without a full-size pass."""
    return jnp.zeros((batch, self.scale, self.scale, 3), jnp.float32)

  @property
  def num_stages(self) -> int:
    return int(math.log2(self.scale))

  @property
  def num_habs(self) -> int:
    return self.number - 1 if self.hab_num is None else self.hab_num

  def __post_init__(self) -> None:
    self.check()
    super().__post_init__()

  def check(self) -> None:
    """Raise ValueError naming the first invalid field (run once, when the model is built)."""
    for name in ("scale", "n_feats", "number", "reduction") + ("hab_num",) * (self.hab_num is not None):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"SPADNet.{name} must be an integer, got {value!r}")
    for name in ("use_lsac", "use_gsac", "heatmap_branch"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"SPADNet.{name} must be true or false, got {getattr(self, name)!r}")
    for name in ("pac_kernel", "pac_impl", "conv_impl", "gsac_gate"):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"SPADNet.{name} must be a name, got {getattr(self, name)!r}")
    if self.scale not in SCALES:
      raise ValueError(f"SPADNet.scale must be one of {SCALES}, got {self.scale}")
    if not 1 <= self.number <= MAX_BLOCKS:
      raise ValueError(f"SPADNet.number must be in [1, {MAX_BLOCKS}], got {self.number}")
    if not 0 <= self.num_habs <= self.number - 1:
      raise ValueError(f"SPADNet.hab_num must be in [0, number-1={self.number - 1}], "
                       f"got {self.hab_num}")
    if not 1 <= self.n_feats <= MAX_FEATS:
      raise ValueError(f"SPADNet.n_feats must be in [1, {MAX_FEATS}], got {self.n_feats}")
    if not 1 <= self.reduction <= self.n_feats:
      raise ValueError(f"SPADNet.reduction must be in [1, n_feats={self.n_feats}], "
                       f"got {self.reduction}")
    if self.pac_kernel not in ops.KERNELS:
      raise ValueError(f"SPADNet.pac_kernel must be one of {sorted(ops.KERNELS)}, "
                       f"got {self.pac_kernel!r}")
    if self.pac_impl not in ops.PAC_IMPLS:
      raise ValueError(f"SPADNet.pac_impl must be one of {sorted(ops.PAC_IMPLS)}, "
                       f"got {self.pac_impl!r}")
    if self.conv_impl not in ops.CONV_IMPLS:
      raise ValueError(f"SPADNet.conv_impl must be one of {sorted(ops.CONV_IMPLS)}, "
                       f"got {self.conv_impl!r}")
    if self.remat not in REMAT:
      raise ValueError(f"SPADNet.remat must be one of {REMAT}, got {self.remat!r}")
    if self.gsac_gate not in ("official", "channel"):
      raise ValueError(f"SPADNet.gsac_gate must be 'official' or 'channel', got {self.gsac_gate!r}")

  def submodule_names(self) -> set[str]:
    """The names __call__ gives its top-level submodules, so stored parameters can be
    checked against a configuration before anything is traced."""
    names = {"head", "sr_out"} | ({"hm_out"} if self.heatmap_branch else set())
    for s in range(1, self.num_stages + 1):
      names |= {f"stage{s}_sr{i}" for i in range(self.number)} | {f"stage{s}_sr_up"}
      names |= {f"stage{s}_hab{i}" for i in range(self.num_habs)}
      if self.heatmap_branch:
        names |= {f"stage{s}_hm{i}" for i in range(self.number)} | {f"stage{s}_hm_up"}
    return names

  @property
  def hab_options(self) -> HabOptions:
    return HabOptions(self.pac_kernel, self.pac_impl, self.gsac_gate, self.use_lsac, self.use_gsac,
                      self.conv_impl)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"SPADNet expects (N, H, W, 3) images, got shape {x.shape}")
    plain = lambda block, *args: block(*args)
    call = remat_call if self.remat in ("rcab", "all") else plain
    call_hab = remat_call if self.remat == "all" else plain
    x = x.astype(self.dtype)
    conv = lambda features, name: conv3x3(features, name, self.dtype, self.conv_impl)
    feature = conv(self.n_feats, "head")(ops.pixel_unshuffle(x, self.scale))
    sr = hm = feature
    for s in range(1, self.num_stages + 1):
      for i in range(self.number):
        sr = call(RCAB(self.reduction, self.dtype, self.conv_impl, name=f"stage{s}_sr{i}"), sr)
        if self.heatmap_branch:
          hm = call(RCAB(self.reduction, self.dtype, self.conv_impl, name=f"stage{s}_hm{i}"), hm)
        if i < self.num_habs:
          guide = hm if self.heatmap_branch else sr
          sr = call_hab(HAB(self.hab_options, self.dtype, name=f"stage{s}_hab{i}"), sr, guide)
      sr = Upsample2x(self.dtype, self.conv_impl, name=f"stage{s}_sr_up")(sr) + ops.bicubic_upsample(feature, 2**s)
      if self.heatmap_branch:
        hm = Upsample2x(self.dtype, self.conv_impl, name=f"stage{s}_hm_up")(hm)
    sr_img = conv(3, "sr_out")(sr).astype(jnp.float32)
    if not self.heatmap_branch:
      return sr_img, None
    return sr_img, conv(NUM_HEATMAPS, "hm_out")(hm).astype(jnp.float32)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
