"""Where a step's device time goes: trace a few steps and rank HLO ops and model layers.

    python -m benchmarks.profile [--case train|inference] [--batch 64] [--dtype bfloat16]
                                 [--remat none] [--pac_impl auto] [--steps 3] [--dir DIR]

Traces `steps` compiled steps with jax.profiler, reads the trace's device events (GPU
streams; XLA:CPU's thunks on a CPU), and prints two tables: the HLO ops that took the
most time and the time per model layer type (forward and backward apart, block indices
merged: 'stage3_hab#/lsac'). The trace and the compiled HLO stay in DIR for a closer look.
XLA:GPU compiles identical fusions once and names the kernel after the first of them, so
such a kernel's time lands on that first op's layer: read the layer table as a guide and
the totals (device busy over the traced span) as the measurement.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time

_INSTRUCTION = re.compile(r'^\s+(ROOT\s+)?%?([\w.\-]+) = ')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_BLOCK_INDEX = re.compile(r"(_sr|_hm|_hab)\d+")
_XLA_KERNEL = re.compile(r"[a-z_\-]*(fusion|convert|copy|slice|transpose|reduce|concatenate|broadcast)[\w\-]*")


def layer_of(op_name: str) -> str:
  """'jit(step)/transpose(jvp(SPADNet))/stage3_hab0/lsac/...' -> 'bwd stage3_hab#/lsac'."""
  parts = op_name.split("/")
  for i, part in enumerate(parts):
    if "SPADNet" in part:
      scope = "/".join(_BLOCK_INDEX.sub(r"\1#", p) for p in parts[i + 1:i + 3]
                       if not p.startswith(("jit(", "cond", "while")))
      return ("bwd " if "transpose(" in part else "fwd ") + (scope or "(top level)")
  return "outside the model (loss, optimiser)"


def op_layers(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> model layer, from the op_name metadata of the compiled HLO.

  A fusion without metadata of its own takes its fused computation's (the root's first).
  """
  own: dict[str, str] = {}
  calls: dict[str, str] = {}
  computation_op: dict[str, str] = {}
  computation = ""
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, op = m.group(2), _OP_NAME.search(line)
    if op:
      own[name] = op.group(1)
      if m.group(1) or computation not in computation_op:
        computation_op[computation] = op.group(1)
    elif (c := _CALLS.search(line)):
      calls[name] = c.group(1)
  for name, callee in calls.items():
    if callee in computation_op:
      own[name] = computation_op[callee]
  return {name: layer_of(op_name) for name, op_name in own.items()}


def _op_of(event: dict) -> str:
  """The HLO op a device event ran. Kernels launched inside a command buffer (a CUDA graph)
  name the buffer as their op, so they are named by the kernel: XLA names each kernel after
  its fusion ('loop_add_fusion_3' for loop_add_fusion.3); library kernels keep the buffer.
  """
  op = event.get("args", {}).get("hlo_op", event["name"])
  if op.startswith("command_buffer") and _XLA_KERNEL.fullmatch(event["name"]):
    return re.sub(r"_(\d+)$", r".\1", event["name"])
  return op


def device_op_times(trace: dict) -> tuple[dict[str, float], float]:
  """Microseconds per HLO op summed over the device's events, and the traced span.

  A GPU's kernels are read from its stream lines (each kernel names its HLO op); on a CPU
  every thunk event that names an HLO op counts.
  """
  events = trace["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  gpu = {pid for pid, name in procs.items() if "GPU" in name or "device:" in name}
  times: dict[str, float] = collections.defaultdict(float)
  start, end = float("inf"), 0.0
  for e in events:
    if e.get("ph") != "X":
      continue
    if gpu:
      if e["pid"] not in gpu or not threads.get((e["pid"], e["tid"]), "").startswith("Stream"):
        continue
    elif "hlo_op" not in e.get("args", {}):
      continue
    times[_op_of(e)] += e["dur"]
    start, end = min(start, e["ts"]), max(end, e["ts"] + e["dur"])
  return dict(times), max(end - start, 0.0)


def summarize(trace: dict, hlo_text: str, steps: int, top: int = 25) -> str:
  """Two markdown tables: top HLO ops and time per layer, in ms per step."""
  times, span = device_op_times(trace)
  layers = op_layers(hlo_text)
  busy = sum(times.values())
  by_layer: dict[str, float] = collections.defaultdict(float)
  for op, us in times.items():
    by_layer[layers.get(op, "(no metadata)")] += us
  ms = lambda us: us / steps / 1e3
  lines = [f"device busy {ms(busy):.2f} ms/step over a traced span of {ms(span):.2f} ms/step "
           f"({steps} steps)", "", "| HLO op | layer | ms/step | share |", "|---|---|---|---|"]
  for op, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"| {op} | {layers.get(op, '-')} | {ms(us):.3f} | {us / busy:.1%} |")
  lines += ["", "| layer | ms/step | share |", "|---|---|---|"]
  for layer, us in sorted(by_layer.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"| {layer} | {ms(us):.3f} | {us / busy:.1%} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", default="train", choices=["train", "inference"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", default="none")
  p.add_argument("--pac_impl", default="auto")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--dir", default="/tmp/spadnet_profile", help="where the trace and HLO go")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp

  from benchmarks import steps
  from spadnet_jax import models
  model = models.SPADNet(scale=8, pac_impl=args.pac_impl, remat=args.remat, dtype=jnp.dtype(args.dtype))
  step_args = steps.step_args(model, args.case, args.batch)
  compiled = jax.jit(steps.step_fn(model, args.case)).lower(*step_args).compile()
  hlo_text = compiled.as_text()
  os.makedirs(args.dir, exist_ok=True)
  with open(os.path.join(args.dir, "step.hlo.txt"), "w") as f:
    f.write(hlo_text)
  jax.block_until_ready(compiled(*step_args))
  t = time.perf_counter()
  with jax.profiler.trace(args.dir):
    for _ in range(args.steps):
      jax.block_until_ready(compiled(*step_args))
  wall = (time.perf_counter() - t) / args.steps
  found = sorted(glob.glob(os.path.join(args.dir, "plugins", "profile", "*", "*.trace.json.gz")))
  if not found:
    raise SystemExit(f"jax.profiler wrote no *.trace.json.gz under {args.dir}")
  with gzip.open(found[-1]) as f:
    trace = json.load(f)
  print(f"{args.case} batch {args.batch} {args.dtype} remat={args.remat} pac_impl={args.pac_impl} "
        f"on {jax.devices()[0].device_kind}: {wall * 1e3:.1f} ms/step wall while tracing")
  print(summarize(trace, hlo_text, args.steps, args.top))


if __name__ == "__main__":
  from spadnet_jax import process_setup
  process_setup.prepare()
  main()
