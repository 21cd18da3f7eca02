"""The trainer's train step and the evaluator's step compiled ahead of time for a TPU slice,
on a machine with no TPU (jax[tpu]'s libtpu compiles for a described topology).

    python -m benchmarks.tpu --topology v5e:4x4 [--config configs/celeba_x8.py]
        [--config.fsdp=16] [--config.model.dtype=bfloat16] [--batch_per_chip 8,32]
        [--eval_batch_per_chip 8] [--fit] [--json FILE]

Per chip it prints argument, output and temporary memory, the peak against the chip's HBM,
XLA's FLOPs and bytes accessed, the bytes of every collective in the compiled HLO, the
compile time, and a roofline time. These are compiled figures, not measured speed: the
roofline is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) + collective bytes / ICI
bandwidth, from the chip's published peaks. --fit finds the largest train batch per chip
whose peak fits in HBM (linear in the batch from the first two compiles, then confirmed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = "configs/celeba_x8.py"


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's published per-chip figures (Google Cloud's TPU system pages)."""
  name: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gb_per_s: float
  ici_gb_per_s: float        # inter-chip interconnect, per chip


CHIPS = {  # keyed by jax.Device.device_kind
    "TPU v4": Chip("v4", 32, 275, 1228, 300),
    "TPU v5 lite": Chip("v5e", 16, 197, 819, 200),
    "TPU v5": Chip("v5p", 95, 459, 2765, 600),
    "TPU v6 lite": Chip("v6e", 32, 918, 1640, 448),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE_LINE = re.compile(
    r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY_TYPE = re.compile(r"(\w+)\[([\d,]*)\]")
GIB = 2 ** 30


def topology_devices(name: str) -> list[Any]:
  """The abstract devices of a TPU slice such as 'v5e:4x4' (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu raises several types
    raise ValueError(f"--topology={name}: not a TPU topology libtpu can describe "
                     f"(e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:4x4): {e}") from e


def _group_size(line: str) -> int:
  """Devices per replica group of a collective, from its replica_groups attribute (iota
  [groups,size]<=..., explicit {{...}}, or mesh[...] with named axes); 1 if absent."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{('[^}]*')\}", line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    n = 1
    for axis in re.findall(r"'(\w+)'", m.group(2)):
      n *= int(sizes.get(axis, 1))
    return n
  return 1


def _array_bytes(types: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY_TYPE.findall(types):
    n = _DTYPE_BYTES.get(dtype, 4)
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n)
  return sizes


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in a compiled HLO module, 'bytes' being
  what a bandwidth-optimal (ring) algorithm sends per chip: 2(n-1)/n of the buffer for an
  all-reduce, (n-1)/n of the full buffer for all-gather, reduce-scatter and all-to-all,
  the buffer for a permute, n being the replica group's size. Async pairs count once."""
  out: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_LINE.search(line)
    if not m:
      continue
    op, sizes = m.group("op"), _array_bytes(m.group("type"))
    if not sizes:
      continue
    if op + "-start(" in line and op != "all-reduce":
      sizes = [max(sizes)]            # an async start's tuple also holds its operand(s)
    n = _group_size(line)
    full = sum(sizes) * (n if op == "reduce-scatter" else 1)
    factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(op, (n - 1) / n)
    entry = out.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += int(full * factor)
  return out


def describe(compiled: Any, chip: Chip, compile_s: float) -> dict[str, Any]:
  """Per-chip memory, cost, collectives and roofline of a compiled TPU executable."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  collectives = collective_bytes(compiled.as_text())
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  moved = sum(c["bytes"] for c in collectives.values())
  compute_s, memory_s = flops / (chip.bf16_tflops * 1e12), accessed / (chip.hbm_gb_per_s * 1e9)
  return {
      "argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
      "temp_gib": mem.temp_size_in_bytes / GIB, "alias_gib": mem.alias_size_in_bytes / GIB,
      "peak_gib": peak / GIB, "hbm_gib": chip.hbm_gib, "fits": peak <= chip.hbm_gib * GIB,
      "gflops": flops / 1e9, "gb_accessed": accessed / 1e9, "collectives": collectives,
      "collective_mib": moved / 2 ** 20, "compile_s": compile_s,
      "roofline_ms": 1e3 * (max(compute_s, memory_s) + moved / (chip.ici_gb_per_s * 1e9)),
      "roofline_bound": "compute" if compute_s >= memory_s else "memory"}


def compile_steps(cfg: Any, topology: str, batch_per_chip: int, eval_batch_per_chip: int = 0
                  ) -> list[dict[str, Any]]:
  """Compile the trainer's train step (and the evaluator's step when eval_batch_per_chip > 0)
  for `topology` with the mesh, partition rules and shardings train.py uses; one record each."""
  # pylint: disable=import-outside-toplevel  # after the process set-up
  from spadnet_jax import evaluation, sharding, trainer
  from spadnet_jax.data import contract
  from spadnet_jax.train_step import inference_params, make_optimizer

  devices = topology_devices(topology)
  chip = CHIPS.get(devices[0].device_kind)
  if chip is None:
    raise ValueError(f"--topology={topology}: no published figures for {devices[0].device_kind!r} "
                     f"(known: {sorted(CHIPS)})")
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.batch_size = batch_per_chip * len(devices)
    cfg.eval_batch_size = max(eval_batch_per_chip, 1) * len(devices)
  mesh = sharding.make_mesh(cfg.fsdp, devices)
  model = trainer.build_model(cfg)
  loss_terms = trainer.validate_config(cfg, mesh.size)
  tx, schedule = make_optimizer(cfg, steps_per_epoch=10_000)
  abstract, shardings = trainer.state_layout(cfg, model, tx, mesh)
  base = {"topology": topology, "chip": chip.name, "chips": len(devices), "fsdp": cfg.fsdp,
          "dtype": cfg.model.dtype, "pac_impl": cfg.model.pac_impl}
  records = []
  start = time.perf_counter()
  compiled = trainer.lower_train_step(cfg, model, tx, schedule, loss_terms, mesh, abstract,
                                      shardings).compile()
  records.append({**base, "step": "train", "batch_per_chip": batch_per_chip,
                  **describe(compiled, chip, time.perf_counter() - start)})
  if eval_batch_per_chip > 0:
    step = evaluation.jit_eval_step(model, mesh, evaluation.Scoring(score=cfg.metric_score),
                                    variables_sharding={"params": inference_params(shardings)})
    batch = contract.batch_spec(cfg.eval_batch_size, model.scale, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = step.lower({"params": inference_params(abstract)}, batch).compile()
    records.append({**base, "step": "eval", "batch_per_chip": eval_batch_per_chip,
                    **describe(compiled, chip, time.perf_counter() - start)})
  return records


def fit_batch(cfg: Any, topology: str, records: Sequence[dict[str, Any]], multiple: int = 8
              ) -> dict[str, Any]:
  """The largest train batch per chip (a multiple of `multiple`) whose peak fits in HBM:
  predicted from two train records (peak linear in the batch), then confirmed by compiling
  it and the next multiple up (stepping up while that fits, down while it does not)."""
  (b0, p0), (b1, p1) = sorted((r["batch_per_chip"], r["peak_gib"]) for r in records[:2])
  per_example = (p1 - p0) / (b1 - b0)
  batch = max(multiple, int((records[0]["hbm_gib"] - (p0 - per_example * b0)) / per_example)
              // multiple * multiple)
  compiled = {r["batch_per_chip"]: r for r in records}

  def fits(b: int) -> bool:
    if b not in compiled:
      compiled[b] = compile_steps(cfg, topology, b)[0]
    return compiled[b]["fits"]

  if fits(batch):
    while fits(batch + multiple):
      batch += multiple
  else:
    while batch > multiple and not fits(batch):
      batch -= multiple
  found = compiled[batch]
  return {**found, "fit": "largest" if found["fits"] else "none fits"}


def table(records: Sequence[dict[str, Any]]) -> str:
  """The printed table, one row per compiled step."""
  head = ("step", "topology", "fsdp", "batch/chip", "args GiB", "out GiB", "temp GiB",
          "peak GiB / HBM", "GFLOP", "collectives MiB", "compile s", "roofline ms")
  rows = [head]
  for r in records:
    kinds = ", ".join(f"{k} {v['count']}" for k, v in sorted(r["collectives"].items()))
    rows.append((r["step"] + (" (largest fit)" if r.get("fit") == "largest" else ""),
                 r["topology"], str(r["fsdp"]), str(r["batch_per_chip"]),
                 f"{r['argument_gib']:.2f}", f"{r['output_gib']:.2f}", f"{r['temp_gib']:.2f}",
                 f"{r['peak_gib']:.2f} / {r['hbm_gib']:g}" + ("" if r["fits"] else " (does not fit)"),
                 f"{r['gflops']:.1f}", f"{r['collective_mib']:.1f}" + (f" ({kinds})" if kinds else ""),
                 f"{r['compile_s']:.0f}", f"{r['roofline_ms']:.1f} ({r['roofline_bound']})"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:4x4.")
flags.DEFINE_list("batch_per_chip", ["8"], "Train batch per chip (comma-separated: one "
                  "compile each); config.batch_size becomes this times the chip count.")
flags.DEFINE_integer("eval_batch_per_chip", 8, "Evaluator batch per chip (0: skip the eval step).")
flags.DEFINE_bool("fit", False, "Also find the largest train batch per chip that fits in HBM "
                  "(needs two --batch_per_chip values).")
flags.DEFINE_string("json", None, "Write the records to this file.")


def main(argv: list[str]) -> int:
  """Compile, print the table, write --json."""
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.topology:
    raise ValueError("--topology is required (e.g. --topology=v5e:4x4)")
  try:
    batches = [int(b) for b in FLAGS.batch_per_chip]
  except ValueError as e:
    raise ValueError(f"--batch_per_chip={','.join(FLAGS.batch_per_chip)}: {e}") from e
  if min(batches) < 1 or (FLAGS.fit and len(set(batches)) < 2):
    raise ValueError("--batch_per_chip: positive integers, two different ones for --fit")
  # Executables for abstract TPU devices cannot be loaded back without a TPU client: reading
  # one from the persistent compilation cache fails (with a warning), so it is not used here.
  import jax  # pylint: disable=import-outside-toplevel  # after the process set-up
  jax.config.update("jax_enable_compilation_cache", False)
  print(f"compiling for {FLAGS.topology} ahead of time: compiled figures, not measured speed",
        flush=True)
  records = []
  for i, batch in enumerate(batches):
    records += compile_steps(FLAGS.config, FLAGS.topology, batch,
                             FLAGS.eval_batch_per_chip if i == 0 else 0)
  if FLAGS.fit:
    records.append(fit_batch(FLAGS.config, FLAGS.topology, [r for r in records if r["step"] == "train"]))
  print(table(records))
  chip = next(c for c in CHIPS.values() if c.name == records[0]["chip"])
  print(f"roofline: max(FLOPs / {chip.bf16_tflops:g} TFLOP/s, bytes / {chip.hbm_gb_per_s:g} GB/s) "
        f"+ collective bytes / {chip.ici_gb_per_s:g} GB/s ({chip.name} published peaks); an "
        "estimate, not a measurement")
  if FLAGS.json:
    from spadnet_jax.storage import files  # pylint: disable=import-outside-toplevel
    with files.atomic_path(FLAGS.json) as tmp, open(tmp, "w") as f:
      json.dump(records, f, indent=2)
  return 0


if __name__ == "__main__":
  from spadnet_jax import cli  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the host only traces; libtpu compiles
  cli.run(main, DEFAULT_CONFIG)
