"""spadnet-jax beside the official PyTorch SPADNet, in one command.

    python -m benchmarks.official --official DIR [--device cpu|cuda] [--rounds 2]
                                  [--settings eager compile ...] [--ours winograd xla]
                                  [--json FILE] [--tiny]

DIR is a checkout of https://github.com/wcy-cs/SPADNet that you fetched (nothing of it is
part of this project; benchmarks/official_torch.py lists the two run-time shims torch 2
needs to run it). Both models get the same weights and inputs. Every measurement runs in a
fresh process of its own, the official and our cases alternating, round after round:

- train step at batch 8 (L1 on the SR image + L1 on the heatmap, Adam 1e-4: the paper's),
  inference at batch 1 and 8 (and 64 with --device cuda), float32 on both sides. PyTorch
  gets its best: each case runs under every torch setting asked for (eager, channels_last,
  torch.compile default and max-autotune; inference always under torch.inference_mode), and
  our ratio is taken against the fastest. Ours runs with each of our convolution
  formulations asked for (--ours: 'winograd', the model's default, and 'xla'; a row each). Our rows
  also give the model's FLOP rate (XLA's count) as a fraction of a large float32 matmul's
  rate measured in the same run.
- onnxruntime (CPU execution provider) running our model exported to ONNX
  (spadnet_jax.export's converter) at inference batch 1 and 8, with --device cpu and the
  export extra installed: a third way to deploy, beside the other two.
- cold start: a user's whole call, PNG to PNG, on 10 aligned 16x16 faces: an official-style
  script (torch.load of the .pth, bicubic x8, net(lr) per face, PNG save; as test.py does)
  against `python -m spadnet_jax.predict`, first call (empty compilation cache) and repeated
  call: wall time, peak memory (max RSS) and lines written to stderr.

Images/s are medians over the rounds; peak memory is max RSS on CPU and the allocator's
peak on a GPU. Every throughput process starts with empty compilation caches (JAX's,
TorchInductor's, Triton's), so each side's peak includes its compiler; our parameters are
drawn on the host, as a checkpoint would give them, and XLA's FLOP count runs in a process
of its own. Prints the tables; --json writes every measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import official_torch

PAPER = {"number": 6, "hab_num": 5}
TINY = {"number": 2, "hab_num": 1}    # the fixtures' small size: the harness end to end, fast
ONNX_ENV = "SPADNET_BENCH_ONNX"       # where run_all's ONNX export lies, for the timing child
# Our settings: the registered conv formulations (ops.CONV_IMPLS), named here so that
# --help imports no JAX (tests/test_official_benchmark.py checks that they agree).
OUR_SETTINGS = ("winograd", "xla")
OUR_DEFAULT = "winograd"   # SPADNet.conv_impl's default: its rows carry no label


@dataclasses.dataclass
class Finished:
  """A child process, as it ended."""
  rc: int
  wall_s: float
  max_rss_gib: float
  stdout: str
  stderr: str


def run_process(cmd: list[str], env: dict[str, str], timeout: float) -> Finished:
  """Run `cmd` to its end (killed after `timeout` s); its wall time and its own max RSS."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
    while True:
      pid, status, usage = os.wait4(p.pid, os.WNOHANG)
      if pid:
        break
      if time.perf_counter() - start > timeout:
        p.kill()
        _, status, usage = os.wait4(p.pid, 0)
        break
      time.sleep(0.005)
    wall = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return Finished(p.returncode, wall, usage.ru_maxrss / 2**20, out.read(), err.read())


def _child_cmd(*args: Any) -> list[str]:
  return [sys.executable, "-m", "benchmarks.official", "--child", *map(str, args)]


def measure(side: str, setting: str, kind: str, batch: int, a: argparse.Namespace,
            size: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
  """One throughput measurement in its own process; a failure is recorded, not raised."""
  args = (side, setting, kind, batch, a.iters, a.device, a.official, size["number"], size["hab_num"])
  with tempfile.TemporaryDirectory() as cache:     # both sides compile from scratch every time
    env = {**env, "SPADNET_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
           "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    done = run_process(_child_cmd(*args), env, a.timeout)
  record = {"side": side, "setting": setting, "case": kind, "batch": batch}
  if done.rc != 0:
    why = "timed out" if done.wall_s > a.timeout else (done.stderr.strip().splitlines() or ["?"])[-1]
    return {**record, "failed": why[:200]}
  record.update(json.loads(done.stdout.strip().splitlines()[-1]))
  if record.get("peak_memory_gib") is None:
    record["peak_memory_gib"] = done.max_rss_gib
  return record


def cold_start(call: str, a: argparse.Namespace, files: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
  """One whole user call, PNG to PNG: 'official' (the official-style script), 'first'
  (predict with an empty compilation cache) or 'repeat' (predict, cache kept)."""
  out = tempfile.mkdtemp(dir=files["root"])
  if call == "official":
    cmd = _child_cmd("official_predict", a.official, files["pth"], files["faces"], out)
    env = {k: v for k, v in env.items() if k != "SPADNET_CACHE_DIR"}
  else:
    if call == "first":
      shutil.rmtree(files["cache"], ignore_errors=True)
    cmd = [sys.executable, "-m", "spadnet_jax.predict", "--checkpoint", files["checkpoint"],
           "--input", files["faces"], "--output", out]
    env = {**env, "SPADNET_CACHE_DIR": files["cache"]}
  done = run_process(cmd, env, a.timeout)
  if done.rc != 0:
    raise RuntimeError(f"cold start {call} failed:\n{done.stderr[-2000:]}")
  written = len(os.listdir(out))
  return {"side": "official" if call == "official" else "spadnet-jax", "case": f"cold_{call}",
          "wall_s": done.wall_s, "peak_memory_gib": done.max_rss_gib, "images": written,
          "stderr_lines": len(done.stderr.strip().splitlines())}


def prepare_inputs(root: str, a: argparse.Namespace, size: dict[str, int], env: dict[str, str]) -> dict[str, str]:
  """The same weights for both sides (the official model's own initialisation, saved as a
  .pth and converted with spadnet_jax.convert) and 10 aligned 16x16 face PNGs."""
  files = {"root": root, "pth": os.path.join(root, "official.pth"),
           "checkpoint": os.path.join(root, "checkpoint"), "faces": os.path.join(root, "faces"),
           "cache": os.path.join(root, "xla_cache")}
  for cmd in (_child_cmd("make_weights", a.official, files["pth"], size["number"], size["hab_num"]),
              [sys.executable, "-m", "spadnet_jax.convert", files["pth"], files["checkpoint"]],
              _child_cmd("make_faces", files["faces"], a.faces)):
    done = run_process(cmd, env, a.timeout)
    if done.rc != 0:
      raise RuntimeError(f"{' '.join(cmd[1:4])} failed:\n{done.stderr[-2000:]}")
  return files


def cases(device: str) -> list[tuple[str, int]]:
  return [("train", 8), ("inference", 1), ("inference", 8)] + ([("inference", 64)] if device == "cuda" else [])


def run_all(a: argparse.Namespace) -> list[dict[str, Any]]:
  """Every measurement, the two sides alternating (which goes first swaps each round)."""
  size = TINY if a.tiny else PAPER
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
  if a.device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  records = []
  with tempfile.TemporaryDirectory() as root:
    files = prepare_inputs(root, a, size, env) if "cold_start" in a.cases else None
    onnx = os.path.join(root, "model.onnx")
    with_onnx = ("inference" in a.cases and a.device == "cpu"
                 and importlib.util.find_spec("jax2onnx") is not None
                 and run_process(_child_cmd("make_onnx", onnx, size["number"], size["hab_num"]),
                                 env, a.timeout).rc == 0)
    env = {**env, ONNX_ENV: onnx}
    for r in range(a.rounds):
      jobs = [("spadnet-jax", "xla", "matmul", 0)]
      if r == 0:      # XLA's FLOP count, apart: its lowering would count in a timed case's memory
        jobs += [("spadnet-jax", "flops", kind, batch) for kind, batch in cases(a.device) if kind in a.cases]
      for kind, batch in cases(a.device):
        if kind in a.cases:
          ours = [("spadnet-jax", conv_impl, kind, batch) for conv_impl in a.ours]
          if with_onnx and kind == "inference":
            ours.append(("onnxruntime", "cpu_ep", kind, batch))
          theirs = [("official", s, kind, batch) for s in a.settings]
          jobs += ours + theirs if r % 2 else theirs + ours
      for side, setting, kind, batch in jobs:
        rec = {**measure(side, setting, kind, batch, a, size, env), "round": r}
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
      if files:
        order = ["official", "first", "repeat"] if r % 2 == 0 else ["first", "repeat", "official"]
        for call in order:
          rec = {**cold_start(call, a, files, env), "round": r}
          records.append(rec)
          print(json.dumps(rec), file=sys.stderr, flush=True)
  return records


def summarize(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
  """Per (side, setting, case, batch): median images/s over rounds, the largest peak memory,
  and failures."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in records:
    if "batch" in r:
      groups.setdefault((r["side"], r["setting"], r["case"], r["batch"]), []).append(r)
  out = {}
  for key, recs in groups.items():
    ok = [r for r in recs if "failed" not in r]
    if key[1] == "flops":
      out[key] = {"gflop_per_image": ok[0]["gflop_per_image"]} if ok else {"failed": recs[-1]["failed"]}
      continue
    out[key] = ({"images_per_s": statistics.median([r["images_per_s"] for r in ok]),
                 "peak_memory_gib": max(r["peak_memory_gib"] for r in ok),
                 "first_call_s": statistics.median([r.get("first_call_s", r.get("compile_s", 0.0)) for r in ok])}
                if ok else {"failed": recs[-1]["failed"]})
  return out


def format_tables(records: list[dict[str, Any]], device: str) -> str:
  """The side-by-side table, every torch setting, and the cold-start calls."""
  s = summarize(records)
  matmul = s.get(("spadnet-jax", "xla", "matmul", 0), {}).get("images_per_s")   # GFLOP/s
  lines = [f"device: {device}; float32; images/s are medians over rounds", "",
           "| case | batch | official, best setting | img/s | peak GiB | spadnet-jax img/s | "
           "peak GiB | speed-up | of matmul rate |", "|---|---|---|---|---|---|---|---|---|"]
  for (side, setting, kind, batch), ours in sorted(s.items()):
    if side != "spadnet-jax" or setting == "flops" or kind == "matmul" or "failed" in ours:
      continue
    theirs = {k[1]: v for k, v in s.items() if k[0] == "official" and k[2:] == (kind, batch) and "failed" not in v}
    best = max(theirs, key=lambda k: theirs[k]["images_per_s"]) if theirs else None
    t = theirs.get(best, {})
    gflop = s.get(("spadnet-jax", "flops", kind, batch), {}).get("gflop_per_image") or float("nan")
    rate = ours["images_per_s"] * gflop
    fraction = f"{rate / matmul:.0%}" if matmul else "-"
    ratio = f"{ours['images_per_s'] / t['images_per_s']:.2f}x" if t else "-"
    label = kind if setting == OUR_DEFAULT else f"{kind} ({setting})"
    lines.append(f"| {label} | {batch} | {best or 'none finished'} | {t.get('images_per_s', float('nan')):.2f} | "
                 f"{t.get('peak_memory_gib', float('nan')):.2f} | {ours['images_per_s']:.2f} | "
                 f"{ours['peak_memory_gib']:.2f} | {ratio} | {fraction} |")
  if matmul:
    lines.append(f"\nXLA float32 matmul in the same run: {matmul:.0f} GFLOP/s")
  lines += ["", "Every torch setting (images/s, peak GiB, first call s):", "",
            "| case | batch | setting | img/s | peak GiB | first call s |", "|---|---|---|---|---|---|"]
  for (side, setting, kind, batch), v in sorted(s.items()):
    if side == "official":
      lines.append(f"| {kind} | {batch} | {setting} | " + (
          f"failed: {v['failed']} | | |" if "failed" in v else
          f"{v['images_per_s']:.2f} | {v['peak_memory_gib']:.2f} | {v['first_call_s']:.1f} |"))
  runtime = {k: v for k, v in s.items() if k[0] == "onnxruntime"}
  if runtime:
    lines += ["", "onnxruntime (CPU execution provider, our model exported to ONNX):", "",
              "| case | batch | img/s | peak GiB | vs spadnet-jax | vs official best |",
              "|---|---|---|---|---|---|"]
    for (_, _, kind, batch), v in sorted(runtime.items()):
      if "failed" in v:
        lines.append(f"| {kind} | {batch} | failed: {v['failed']} | | | |")
        continue
      ours = s.get(("spadnet-jax", OUR_DEFAULT, kind, batch), {}).get("images_per_s")
      theirs = [w["images_per_s"] for k, w in s.items()
                if k[0] == "official" and k[2:] == (kind, batch) and "failed" not in w]
      versus = [f"{v['images_per_s'] / r:.2f}x" if r else "-" for r in (ours, max(theirs, default=None))]
      lines.append(f"| {kind} | {batch} | {v['images_per_s']:.2f} | {v['peak_memory_gib']:.2f} | "
                   f"{versus[0]} | {versus[1]} |")
  cold = [r for r in records if r.get("case", "").startswith("cold_")]
  if cold:
    lines += ["", "Cold start: one whole call, PNG to PNG (medians over rounds):", "",
              "| call | wall s | peak GiB | stderr lines | images |", "|---|---|---|---|---|"]
    names = {"cold_official": "official-style script (test.py's path)",
             "cold_first": "spadnet_jax.predict, first call (empty cache)",
             "cold_repeat": "spadnet_jax.predict, repeated call"}
    for case, name in names.items():
      rs = [r for r in cold if r["case"] == case]
      if rs:
        lines.append(f"| {name} | {statistics.median([r['wall_s'] for r in rs]):.2f} | "
                     f"{max(r['peak_memory_gib'] for r in rs):.2f} | "
                     f"{max(r['stderr_lines'] for r in rs)} | {rs[0]['images']} |")
  return "\n".join(lines)


def child(argv: list[str]) -> None:
  """The work of one child process; its last stdout line is its JSON record."""
  what, rest = argv[0], argv[1:]
  if what == "make_weights":
    checkout, pth, number, hab_num = rest
    import torch  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    with official_torch.quiet_stdout():
      net = official_torch.load_official(checkout, 8, int(number), int(hab_num))
    torch.save(net.state_dict(), pth)
  elif what == "make_faces":
    make_faces(rest[0], int(rest[1]))
  elif what == "make_onnx":
    make_onnx(rest[0], {"number": int(rest[1]), "hab_num": int(rest[2])})
  elif what == "official_predict":
    with official_torch.quiet_stdout():
      official_torch.official_style_predict(*rest)
  else:
    side, setting, kind, batch, iters, device, checkout, number, hab_num = argv
    size = {"number": int(number), "hab_num": int(hab_num)}
    if side == "official":
      with official_torch.quiet_stdout():
        record = official_torch.time_case(checkout, kind, int(batch), setting, int(iters), device,
                                          {"scale": 8, **size})
    elif side == "onnxruntime":
      record = onnxruntime_rate(os.environ[ONNX_ENV], int(batch), int(iters))
    elif kind == "matmul":
      record = matmul_rate(int(iters))
    elif setting == "flops":
      record = model_flops(kind, int(batch), size)
    else:
      from benchmarks import run  # pylint: disable=import-outside-toplevel
      record = run.case_model(kind, int(batch), int(iters), "float32", "auto", "none", **size,
                              count_flops=False, conv_impl=setting)[0]
    print(json.dumps(record))


def make_onnx(path: str, size: dict[str, int]) -> None:
  """Our model (the same initialisation as our rows' host parameters) exported to ONNX."""
  from benchmarks import steps  # pylint: disable=import-outside-toplevel
  from spadnet_jax import models  # pylint: disable=import-outside-toplevel
  from spadnet_jax.serving import artifacts  # pylint: disable=import-outside-toplevel
  model = models.SPADNet(scale=8, **size)
  with open(path, "wb") as f:
    f.write(artifacts.onnx_model(model, {"params": steps.host_params(model)}))


def onnxruntime_rate(path: str, batch: int, iters: int) -> dict[str, Any]:
  """Images/s of the ONNX model in onnxruntime's CPU execution provider (its default
  threads), the median of `iters` timed calls after a first, untimed one."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  x = np.random.default_rng(0).random((batch, 128, 128, 3), np.float32)
  session.run(None, {"lr_up": x})
  first = time.perf_counter() - start
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    session.run(None, {"lr_up": x})
    times.append(time.perf_counter() - t)
  return {"images_per_s": batch / statistics.median(times), "first_call_s": first,
          "peak_memory_gib": None}


def model_flops(kind: str, batch: int, size: dict[str, int]) -> dict[str, Any]:
  """XLA's FLOP count per image of our step (the unrolled 'shifted' PAC: its loops hide none;
  the direct convolution: the model's FLOPs, not those a faster formulation performs)."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import run, steps  # pylint: disable=import-outside-toplevel
  from spadnet_jax import models  # pylint: disable=import-outside-toplevel
  model = models.SPADNet(scale=8, **size, pac_impl="shifted", conv_impl="xla")
  specs = [jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arg)
           for arg in steps.step_args(model, kind, batch)]
  return {"gflop_per_image": run.xla_flops(steps.step_fn(model, kind, for_counting=True), specs) / batch / 1e9}


def matmul_rate(iters: int, n: int = 4096) -> dict[str, Any]:
  """XLA's float32 rate on an n x n matmul, GFLOP/s (reported in 'images_per_s')."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from benchmarks import run  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a).lower(x).compile()
  return {"images_per_s": 2 * n**3 / run.median_seconds(f, [x], max(iters, 3)) / 1e9,
          "peak_memory_gib": None}


def make_faces(folder: str, count: int) -> None:
  """`count` aligned 16x16 faces: the embedded synthetic faces reduced with Pillow's bicubic."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from spadnet_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    face = synthetic.draw_face(i)[0]
    Image.fromarray(face).resize((16, 16), Image.BICUBIC).save(os.path.join(folder, f"face{i:02d}.png"))


def main() -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.official", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--official", help="a checkout of the official SPADNet repository (required)")
  p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every case")
  p.add_argument("--iters", type=int, default=5, help="timed steps per measurement")
  p.add_argument("--settings", nargs="+", default=list(official_torch.SETTINGS),
                 choices=list(official_torch.SETTINGS), help="torch settings tried")
  p.add_argument("--ours", nargs="+", default=[OUR_DEFAULT], choices=OUR_SETTINGS,
                 help="our 3x3 conv formulations timed (SPADNet.conv_impl)")
  p.add_argument("--cases", nargs="+", default=["train", "inference", "cold_start"],
                 choices=["train", "inference", "cold_start"])
  p.add_argument("--faces", type=int, default=10, help="faces in the cold-start call")
  p.add_argument("--timeout", type=float, default=900, help="seconds one process may take")
  p.add_argument("--tiny", action="store_true", help="2 blocks per branch, 1 HAB (a harness check, not a figure)")
  p.add_argument("--json", default=None, help="also write every measurement here")
  p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    child(a.child)
    return
  if not a.official:
    p.error("--official DIR is required: a checkout of https://github.com/wcy-cs/SPADNet")
  if not os.path.isfile(os.path.join(a.official, "model", "__init__.py")):
    p.error(f"--official {a.official}: no model/__init__.py there; give a checkout of "
            "https://github.com/wcy-cs/SPADNet")
  records = run_all(a)
  device = f"{a.device} ({os.cpu_count()} CPU cores)"
  print(format_tables(records, device))
  if a.json:
    from spadnet_jax.storage.files import atomic_path  # pylint: disable=import-outside-toplevel
    with atomic_path(a.json) as tmp, open(tmp, "w") as f:
      json.dump({"device": device, "records": records}, f, indent=2)


if __name__ == "__main__":
  if "--child" in sys.argv and "spadnet-jax" in sys.argv:
    from spadnet_jax import process_setup  # pylint: disable=import-outside-toplevel
    process_setup.prepare()   # our side runs as train.py and predict do; torch's untouched
  main()
