"""Block rematerialisation whose recomputation the compiler cannot move forward.

`nn.remat` (jax.checkpoint) only guards the recomputation's inputs against CSE; XLA:CPU's
scheduler then runs the recomputation during the forward pass and keeps its results, so
it saved no memory there (measured). Here the backward pass first joins the saved inputs
with the incoming cotangent in one optimization barrier, so recomputing a block can only
start once that block's gradient is being computed.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def remat_call(block: nn.Module, *args: Any) -> Any:
  """block(*args), keeping only its parameters and inputs for the backward pass."""
  unbound = block.clone(parent=None)

  def fn(mdl, *a):
    return mdl(*a)

  def fwd(mdl, *a):
    return mdl(*a), (mdl.variables["params"], a)

  def grads(res, out_t):
    params, a = res
    _, vjp = jax.vjp(lambda p, *xs: unbound.apply({"params": p}, *xs), params, *a)
    params_t, *args_t = vjp(out_t)
    return ({"params": params_t}, *args_t)

  def grads_cpu(res, out_t):
    # XLA:CPU removes optimization barriers before CSE, so make the recomputation's inputs
    # depend on the cotangent: adding probe - probe (0, or NaN for a non-finite cotangent,
    # whose gradients are non-finite anyway) is not folded away and cannot be hoisted.
    probe = out_t.reshape(-1)[0]
    params, a = res
    a = jax.tree_util.tree_map(lambda v: v + (probe - probe).astype(v.dtype), a)
    return grads((params, a), out_t)

  def bwd(res, out_t):
    res, out_t = jax.lax.optimization_barrier((res, out_t))
    return jax.lax.platform_dependent(res, out_t, cpu=grads_cpu, default=grads)

  return nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd)(block, *args)
