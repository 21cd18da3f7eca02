"""Export a checkpoint for use outside this codebase (ONNX and a serialized JAX program).

    python -m spadnet_jax.export --checkpoint CK --output DIR [--overwrite]

Writes DIR/model.onnx, DIR/model.jaxexport and DIR/export.json (spadnet_jax/serving/
artifacts.py says what each holds). DIR is refused when it exists and is not empty, unless
--overwrite. The folder is written under a temporary name beside DIR and renamed only once
both artifacts reproduce the model's sr and heatmap on held inputs at batch 1 and 3 within
1e-4: an interrupted or failed export leaves nothing. CK may be a gs:// URL; DIR is local.
Needs the export extra: pip install -e .[export].
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

CONTRACT = {
    "input": {"name": "lr_up", "shape": ["N", 128, 128, 3], "dtype": "float32", "layout": "NHWC",
              "range": [0.0, 1.0], "colour": "RGB",
              "made_by": "the LR face (128/scale px square, 8-bit RGB) resized to 128x128 with "
                         "Pillow's bicubic kernel (Image.BICUBIC), as float / 255 (predict "
                         "resizes in float32; Pillow on 8-bit differs by its rounding)"},
    "outputs": [{"name": "sr", "shape": ["N", 128, 128, 3], "dtype": "float32", "layout": "NHWC",
                 "range": "about [0, 1]; clip before saving"},
                {"name": "heatmap", "shape": ["N", 128, 128, 5], "dtype": "float32",
                 "layout": "NHWC", "channels": "landmark groups (eyes, nose, mouth)"}],
}


def _check_output(output: str, overwrite: bool) -> None:
  """One line before anything is loaded: an output that exists and is not an empty folder
  (without --overwrite), or whose parent cannot be written."""
  if os.path.exists(output):
    if not os.path.isdir(output):
      raise ValueError(f"--output {output} is a file")
    if os.listdir(output) and not overwrite:
      raise ValueError(f"--output {output} exists and is not empty; choose a new folder or "
                       "pass --overwrite")
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise PermissionError(f"--output {output}: cannot write into {parent}")


def export(checkpoint_path: str, output: str, overwrite: bool = False) -> dict:
  """Write the export folder `output` from the checkpoint at `checkpoint_path` (its newest
  intact step); returns export.json's content."""
  from spadnet_jax.serving import artifacts  # pylint: disable=import-outside-toplevel
  artifacts.require_extra()
  _check_output(output, overwrite)
  from spadnet_jax import checkpoint, models  # pylint: disable=import-outside-toplevel
  from spadnet_jax.storage import paths  # pylint: disable=import-outside-toplevel
  source = paths.resolve(checkpoint_path, "--checkpoint")
  config, _ = checkpoint.read_model_config(source)
  artifacts.check_exportable(config)
  model, variables, step = checkpoint.load_model(source)
  # The artifacts run in other processes, whose XLA flags may leave the YNN fusions on that
  # make Winograd's transforms slow (ops.conv): they carry XLA's own convolution.
  model = model.clone(conv_impl="xla")
  import jax  # pylint: disable=import-outside-toplevel  # after the checks: --help needs no JAX
  variables = jax.device_get(variables)
  start = time.perf_counter()
  onnx_bytes = artifacts.onnx_model(model, variables)
  program = artifacts.jax_program(model, variables)
  seconds = time.perf_counter() - start
  figures = artifacts.parity(model, variables, onnx_bytes, program)
  manifest = {"format": 1, "checkpoint": os.fspath(source), "step": step, "scale": model.scale,
              "model": models.to_config(model), **CONTRACT, "onnx_opset": artifacts.OPSET,
              "jaxexport_platforms": list(artifacts.PLATFORMS), "versions": artifacts.versions(),
              "parity": figures, "export_seconds": round(seconds, 2)}
  output = os.path.abspath(output)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=os.path.dirname(output))
  try:
    with open(os.path.join(tmp, artifacts.ONNX), "wb") as f:
      f.write(onnx_bytes)
    with open(os.path.join(tmp, artifacts.JAXEXPORT), "wb") as f:
      f.write(program)
    with open(os.path.join(tmp, artifacts.MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)         # a folder for others to read, not mkdtemp's 0700
    if os.path.isdir(output):
      old = f"{tmp}.old"
      os.rename(output, old)
      os.rename(tmp, output)
      shutil.rmtree(old)
    else:
      os.rename(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="a checkpoint folder (its newest intact "
                 "step) or one step; a gs:// URL too")
  p.add_argument("--output", required=True, help="the export folder to create")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
  p.add_argument("--verbosity", type=int, default=0, help="1: tracebacks and library logs")
  a = p.parse_args(argv)
  from spadnet_jax import cli  # pylint: disable=import-outside-toplevel
  from spadnet_jax.serving import artifacts  # pylint: disable=import-outside-toplevel
  cli.quiet_logging(a.verbosity >= 1, data_sets=False)

  def run() -> int:
    m = export(a.checkpoint, a.output, a.overwrite)
    worst = max(v for k, v in m["parity"].items() if k.endswith("_max_abs"))
    sizes = ", ".join(f"{n} {os.path.getsize(os.path.join(a.output, n)) / 2**20:.1f} MiB"
                      for n in (artifacts.ONNX, artifacts.JAXEXPORT))
    print(f"exported step {m['step']} (x{m['scale']}) to {a.output}: {sizes}; "
          f"both reproduce the model within {worst:.2g} (batch 1 and 3)")
    return 0

  return cli.one_line_errors(run, a.verbosity >= 1,
                             (artifacts.ExportUnavailable, artifacts.ExportMismatch))


if __name__ == "__main__":
  from spadnet_jax import process_setup
  process_setup.prepare(long_running=False)
  sys.exit(main(sys.argv[1:]))
