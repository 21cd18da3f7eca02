"""Model benchmarks: training and inference speed, peak memory, compile time, FLOPs, MFU.

    python -m benchmarks.run [--quick] [--json FILE] [--cases train inference pac]
                             [--dtype bfloat16] [--batches 8 64] [--remat rcab]

Each case runs in its own process so its peak memory is its own: max RSS on CPU (as for
the PyTorch reference in SPEC.md), the allocator's peak on an accelerator. FLOPs are model
FLOPs (XLA's count for the unrolled 'shifted' PAC and XLA's convolution, no rematerialisation); MFU is achieved
FLOP/s over the device's dense peak for the dtype (PEAK_TFLOPS, or --peak_tflops).
The plain conv layer's FLOP rate (in the 'pac' case) is the ceiling the model's
convolutions work under. Prints one table; --json writes the records.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

# Official PyTorch code on the 2-core CI machine kind (SPEC.md).
REFERENCE = {("train", 8): 1.05, ("inference", 1): 3.85, ("inference", 8): 3.36}
# Dense tensor-core peaks (vendor datasheets, SXM parts), TFLOP/s; float32 runs as TF32.
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 494.0},
               "H200": {"bfloat16": 989.0, "float32": 494.0},
               "A100": {"bfloat16": 312.0, "float32": 156.0}}


def xla_flops(fn: Callable[..., Any], specs: Any) -> float:
  """XLA's FLOP count of fn, lowered for the CPU: the same model FLOPs on every device.

  The specs are placed on the CPU device: a CPU lowering made for a GPU backend got no
  cost analysis from a plugin (PJRT C API) backend (jax 0.11 on an H100: NaN).
  """
  import jax
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  specs = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), specs)
  lowered = jax.jit(fn).trace(*specs).lower()
  cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _peak_device_memory_gib() -> float | None:
  """The allocator's peak on an accelerator; None on CPU (the parent reads max RSS)."""
  import jax
  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    return None
  stats = dev.memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def median_seconds(fn: Callable[..., Any], args: list[Any], iters: int,
                   thread_state: bool = False) -> float:
  """Median seconds per call over `iters` calls (each waited for) after two warm-up calls;
  a train step's new state is fed to the next call.

  The median, not the mean: this VM has slow spells that stretch single steps by 10-50%.
  """
  import jax
  for _ in range(2):
    out = fn(*args)
    if thread_state:
      args = [out[0], *args[1:]]
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
    if thread_state:
      args = [out[0], *args[1:]]
  return sorted(times)[len(times) // 2]


def case_model(kind: str, batch: int, iters: int, dtype: str, pac_impl: str,
               remat: str, number: int = 6, hab_num: int | None = None,
               count_flops: bool = True, conv_impl: str = "winograd") -> list[dict]:
  """SPADNet x8 (paper size unless `number`/`hab_num` say fewer blocks): the trainer's
  train step or a forward pass. count_flops=False leaves out XLA's FLOP count, whose
  lowering of a second (unrolled) model would count in this process's peak memory."""
  import jax
  import jax.numpy as jnp

  from benchmarks import steps
  from spadnet_jax import models, process_setup
  size = {"scale": 8, "number": number, "hab_num": hab_num}
  model = models.SPADNet(**size, pac_impl=pac_impl, conv_impl=conv_impl, remat=remat,
                         dtype=jnp.dtype(dtype))
  fn = steps.step_fn(model, kind)
  args = steps.step_args(model, kind, batch)
  specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  donate = (0,) if kind == "train" else ()
  t = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  compile_s = time.perf_counter() - t
  process_setup.release_host_memory()     # as train.py does after compiling
  sec = median_seconds(compiled, args, iters, thread_state=kind == "train")
  peak_gib = _peak_device_memory_gib()
  counted = models.SPADNet(**size, pac_impl="shifted", conv_impl="xla", remat="none",
                           dtype=jnp.dtype(dtype))
  flops = xla_flops(steps.step_fn(counted, kind, for_counting=True), specs) if count_flops else float("nan")
  return [{"name": kind, "batch": batch, "dtype": dtype, "pac_impl": pac_impl,
           "conv_impl": conv_impl, "remat": remat,
           "s_per_step": sec, "images_per_s": batch / sec, "compile_s": compile_s,
           "gflop_per_image": flops / batch / 1e9, "achieved_tflop_s": flops / sec / 1e12,
           "peak_memory_gib": peak_gib}]


def case_pac(iters: int, dtype: str, batch: int) -> list[dict]:
  """The LSAC layer alone (forward + backward) against a plain 3x3 conv of the same shape."""
  import jax
  import jax.numpy as jnp

  from spadnet_jax import ops
  dt = jnp.dtype(dtype)
  shape = (batch, 64, 64, 64)
  x = jax.random.normal(jax.random.key(0), shape, dt)
  h = (jax.random.normal(jax.random.key(1), shape) * 0.1).astype(dt)
  w = (jax.random.normal(jax.random.key(2), (3, 3, 64, 64)) * 0.05).astype(dt)
  b = jnp.zeros((64,), dt)

  def conv(x, h, w, b):   # the model's conv layer; b's gradient is not taken, as for the PACs
    del h
    return ops.conv3x3(x, w, b, impl="xla")

  def pac(impl):
    return lambda x, h, w, b: ops.pac_conv(x, ops.gaussian_kernel(h).astype(dt), w, b, impl=impl)

  cases, grads = {}, {}
  for name, f in [("conv3x3", conv)] + [(f"pac_{i}", pac(i)) for i in sorted(ops.PAC_IMPLS)]:
    loss = lambda x, h, w, b, f=f: jnp.sum(f(x, h, w, b).astype(jnp.float32) ** 2)
    grads[name] = jax.grad(loss, argnums=(0, 1, 2))
    cases[name] = jax.jit(grads[name]).lower(x, h, w, b).compile()
  times = _interleaved_medians(cases, [x, h, w, b], max(iters, 5))
  # The plain conv's FLOP rate is the ceiling the model's convolutions work under.
  conv_flops = xla_flops(grads["conv3x3"], [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, h, w, b)])
  records = []
  for name, compiled in cases.items():
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20 if mem else float("nan")
    records.append({"name": f"layer_{name}_fwd_bwd", "batch": batch, "dtype": dtype,
                    "s_per_step": times[name], "images_per_s": batch / times[name], "temp_mib": temp,
                    "time_vs_conv3x3": times[name] / times["conv3x3"]})
  records[0]["achieved_tflop_s"] = conv_flops / times["conv3x3"] / 1e12
  return records


def _interleaved_medians(fns: dict, args: list, rounds: int) -> dict[str, float]:
  """Median seconds per call of each fn, timed in turn round after round.

  The layer figures are read as ratios to the convolution; interleaving gives every case
  the same share of a noisy machine's slow spells, and the median drops the spells.
  """
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def run_case(args: list[str]) -> list[dict]:
  """Run one case in a child process; on CPU add that process's peak memory (max RSS)."""
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
    if r.get("peak_memory_gib") is None and len(records) == 1:
      r["peak_memory_gib"] = usage.ru_maxrss / 2**20   # KiB -> GiB
  return records


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for key, peaks in PEAK_TFLOPS.items():
    if key in device_kind:
      return peaks.get(dtype)
  return None


def _versus(r: dict, ref: float | None, device: str) -> str:
  """Speed-up over the PyTorch reference (CPU, float32), or a layer's time over the conv's."""
  if r.get("time_vs_conv3x3") is not None:
    return f"{r['time_vs_conv3x3']:.2f}x conv time"
  return f"{r['images_per_s'] / ref:.2f}x PyTorch" if ref and "cpu" in device else "-"


def format_table(records: list[dict], device: str) -> str:
  lines = [f"device: {device}", "",
           "| case | batch | dtype | remat | s/step | images/s | vs reference | compile s | "
           "GFLOP/img | TFLOP/s | MFU | peak mem GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    ref = REFERENCE.get((r["name"], r["batch"])) if r.get("dtype") == "float32" else None
    fmt = lambda k, f, r=r: (f.format(r[k]) if r.get(k) is not None else "-")
    lines.append(
        f"| {r['name']} | {r['batch']} | {r.get('dtype', '-')} | {r.get('remat', '-')} | "
        f"{r['s_per_step']:.4f} | {r['images_per_s']:.2f} | "
        f"{_versus(r, ref, device)} | "
        f"{fmt('compile_s', '{:.1f}')} | {fmt('gflop_per_image', '{:.2f}')} | "
        f"{fmt('achieved_tflop_s', '{:.3f}')} | {fmt('mfu', '{:.1%}')} | "
        f"{fmt('peak_memory_gib', '{:.2f}')} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", nargs="+", default=["train", "inference", "pac"],
                 choices=["train", "inference", "pac"])
  p.add_argument("--quick", action="store_true", help="fewer timed iterations")
  p.add_argument("--iters", type=int, default=None, help="timed iterations per case")
  p.add_argument("--json", default=None, help="also write the records to this file")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--pac_impl", default="auto")
  p.add_argument("--conv_impl", default="winograd", help="SPADNet.conv_impl (ops.CONV_IMPLS; "
                 "default: the model's)")
  p.add_argument("--remat", default="none", help="SPADNet.remat for the train case")
  p.add_argument("--batches", type=int, nargs="+", default=None,
                 help="default: 8 for train, 1 and 8 for inference")
  p.add_argument("--pac_batch", type=int, default=8)
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="device peak for MFU (default: PEAK_TFLOPS by device kind)")
  p.add_argument("--child", nargs="*", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child is not None:
    kind, batch, iters, dtype, impl, remat, conv_impl = args.child
    recs = (case_pac(int(iters), dtype, int(batch)) if kind == "pac" else
            case_model(kind, int(batch), int(iters), dtype, impl, remat, conv_impl=conv_impl))
    print(json.dumps(recs))
    return
  import jax  # only for the device name
  kind = jax.devices()[0].device_kind
  device = f"{kind} x{jax.device_count()} ({os.cpu_count()} CPU cores)"
  iters = args.iters or (3 if args.quick else 10)
  peak = args.peak_tflops or peak_tflops(kind, args.dtype)
  records = []
  for case in args.cases:
    if case == "pac":
      records += run_case(["pac", str(args.pac_batch), str(iters), args.dtype, "-", "-", "-"])
      continue
    for b in args.batches or ([8] if case == "train" else [1, 8]):
      remat = args.remat if case == "train" else "none"
      records += run_case([case, str(b), str(iters), args.dtype, args.pac_impl, remat,
                           args.conv_impl])
      print(json.dumps(records[-1]), flush=True)
  for r in records:
    r["device"] = device
    if peak and r.get("achieved_tflop_s") is not None:
      r["mfu"] = r["achieved_tflop_s"] / peak
  print("\n" + format_table(records, device))
  if args.json:
    from spadnet_jax.storage.files import atomic_path
    with atomic_path(args.json) as tmp, open(tmp, "w") as f:
      json.dump(records, f, indent=2)


if __name__ == "__main__":
  from spadnet_jax import process_setup
  process_setup.prepare()   # as train.py does; the cases' processes inherit it
  main()
