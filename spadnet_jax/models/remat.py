"""Block rematerialisation whose recomputation the compiler cannot move forward.

`nn.remat` (jax.checkpoint) guards the recomputation with optimization barriers, which
XLA:CPU strips, so there it was merged back into the forward pass and saved no memory
(measured). Here the backward pass recomputes the block from inputs tied to its incoming
gradient (ops.after), so recomputing a block can only start once its gradient arrives.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from spadnet_jax import ops


def remat_call(block: nn.Module, *args: Any) -> Any:
  """block(*args), keeping only its parameters and inputs for the backward pass."""
  unbound = block.clone(parent=None)

  def fn(mdl: nn.Module, *a: Any) -> Any:
    return mdl(*a)

  def fwd(mdl: nn.Module, *a: Any) -> tuple[Any, tuple[Any, tuple[Any, ...]]]:
    return mdl(*a), (mdl.variables["params"], a)

  def bwd(res: tuple[Any, tuple[Any, ...]], out_t: Any) -> tuple[Any, ...]:
    params, a = res
    _, vjp = jax.vjp(lambda p, *xs: unbound.apply({"params": p}, *xs), params, *ops.after(a, out_t))
    params_t, *args_t = vjp(out_t)
    return ({"params": params_t}, *args_t)

  return nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd)(block, *args)
