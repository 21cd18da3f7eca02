"""Model benchmarks: training and inference speed, peak memory, compile time, FLOPs.

    python -m benchmarks.run [--quick] [--json FILE] [--cases train inference pac]

Each case runs in its own process so its peak memory (max RSS, as for the PyTorch
reference in SPEC.md) is its own. Prints one table; --json writes the records.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Official PyTorch code on the 2-core CI machine kind (SPEC.md).
REFERENCE = {("train", 8): 1.05, ("inference", 1): 3.85, ("inference", 8): 3.36}


def _timed(fn, *args, iters: int):
  """Median seconds per call of an already-compiled function (results blocked on)."""
  import jax
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def case_model(kind: str, batch: int, iters: int, dtype: str, pac_impl: str) -> list[dict]:
  """Paper-size SPADNet x8: a train step (L1 + L1, Adam) or a forward pass."""
  import jax
  import jax.numpy as jnp
  import optax
  from spadnet_jax import models
  from spadnet_jax.checkpoint import _DTYPES
  model = models.SPADNet(scale=8, pac_impl=pac_impl, dtype=_DTYPES[dtype])
  x = jax.random.uniform(jax.random.key(0), (batch, 128, 128, 3))
  hm = jax.random.uniform(jax.random.key(1), (batch, 128, 128, 5))
  params = jax.jit(model.init)(jax.random.key(2), model.example_input())["params"]
  if kind == "train":
    tx = optax.adam(1e-4, b1=0.9, b2=0.99, eps=1e-8)

    def step(params, opt_state, x, hm):
      def loss_fn(p):
        sr, h = model.apply({"params": p}, x)
        return jnp.mean(jnp.abs(sr - x)) + jnp.mean(jnp.abs(h - hm))
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    fn = jax.jit(step, donate_argnums=(0, 1))
    args = [params, tx.init(params), x, hm]
  else:
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    args = [params, x]
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  from spadnet_jax import platform
  platform.release_host_memory()     # as train.py does after compiling
  if kind == "train":
    state = compiled(*args)
    jax.block_until_ready(state)
    times = []
    for _ in range(iters):
      t = time.perf_counter()
      state = compiled(state[0], state[1], x, hm)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    sec = statistics.median(times)
  else:
    jax.block_until_ready(compiled(*args))
    sec = _timed(compiled, *args, iters=iters)
  flops = _flops(compiled)
  return [{"name": kind, "batch": batch, "dtype": dtype, "pac_impl": pac_impl,
           "s_per_step": sec, "images_per_s": batch / sec, "compile_s": compile_s,
           "gflop_per_image": flops / batch / 1e9, "achieved_gflop_s": flops / sec / 1e9}]


def case_pac(iters: int) -> list[dict]:
  """The LSAC layer alone (forward + backward) against a plain 3x3 conv of the same shape."""
  import jax
  import jax.numpy as jnp
  from spadnet_jax import ops
  shape = (8, 64, 64, 64)
  x = jax.random.normal(jax.random.key(0), shape)
  h = jax.random.normal(jax.random.key(1), shape) * 0.1
  w = jax.random.normal(jax.random.key(2), (3, 3, 64, 64)) * 0.05
  b = jnp.zeros((64,))

  def conv(x, h, w, b):
    del h
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

  def pac(impl):
    return lambda x, h, w, b: ops.pac_conv(x, ops.gaussian_kernel(h), w, b, impl=impl)

  records = []
  for name, f in [("conv3x3", conv)] + [(f"pac_{i}", pac(i)) for i in sorted(ops.PAC_IMPLS)]:
    g = jax.jit(jax.grad(lambda x, h, w, b: jnp.sum(f(x, h, w, b) ** 2), argnums=(0, 1, 2)))
    compiled = g.lower(x, h, w, b).compile()
    jax.block_until_ready(compiled(x, h, w, b))
    sec = _timed(compiled, x, h, w, b, iters=iters)
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20 if mem else float("nan")
    records.append({"name": f"layer_{name}_fwd_bwd", "batch": shape[0], "s_per_step": sec,
                    "images_per_s": shape[0] / sec, "temp_mib": temp})
  return records


def run_case(args: list[str]) -> list[dict]:
  """Run one case in a child process; add that process's peak memory (max RSS)."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  with tempfile.TemporaryFile("w+") as err:
    p = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--child", *args],
                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status:
      err.seek(0)
      raise RuntimeError(f"benchmark case {args} failed:\n{err.read()[-3000:]}")
  records = json.loads(out.strip().splitlines()[-1])
  for r in records:
    r["peak_memory_gib"] = usage.ru_maxrss / 2**20 if len(records) == 1 else None   # KiB
  return records


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="+", default=["train", "inference", "pac"])
  p.add_argument("--quick", action="store_true", help="fewer timed iterations")
  p.add_argument("--json", default=None, help="also write the records to this file")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--pac_impl", default="fused")
  p.add_argument("--batches", type=int, nargs="+", default=None)
  p.add_argument("--child", nargs="*", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child is not None:
    from spadnet_jax import platform
    platform.configure_xla_cpu()
    kind, batch, iters, dtype, impl = args.child
    recs = (case_pac(int(iters)) if kind == "pac" else
            case_model(kind, int(batch), int(iters), dtype, impl))
    print(json.dumps(recs))
    return
  import jax  # only for the device name
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} CPU cores)"
  iters = 3 if args.quick else 10
  records = []
  for case in args.cases:
    if case == "pac":
      records += run_case(["pac", "0", str(iters), "float32", "-"])
      continue
    batches = args.batches or ([8] if case == "train" else [1, 8])
    for b in batches:
      records += run_case([case, str(b), str(iters if case == "train" else iters * 2), args.dtype,
                           args.pac_impl])
  print(f"\ndevice: {device}\n")
  print("| case | batch | dtype | s/step | images/s | vs PyTorch ref | compile s | GFLOP/img | "
        "GFLOP/s | peak mem GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in records:
    ref = REFERENCE.get((r["name"], r["batch"]))
    fmt = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "-")
    print(f"| {r['name']} | {r['batch']} | {r.get('dtype', 'float32')} | {r['s_per_step']:.3f} | "
          f"{r['images_per_s']:.2f} | {'%.2fx' % (r['images_per_s'] / ref) if ref else '-'} | "
          f"{fmt('compile_s', '{:.1f}')} | {fmt('gflop_per_image', '{:.2f}')} | "
          f"{fmt('achieved_gflop_s', '{:.1f}')} | {fmt('peak_memory_gib', '{:.2f}')} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)


if __name__ == "__main__":
  main()
