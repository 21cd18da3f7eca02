"""The trained model for use outside this codebase: ONNX and a serialized JAX program.

An export folder holds model.onnx (standard ONNX operators, weights inside), model.jaxexport
(jax.export, weights inside, for cpu, cuda and tpu) and export.json (the contract, the
versions and the parity figures). Both take `lr_up`, (N, 128, 128, 3) float32 RGB in [0, 1]
(the LR face upsampled by bicubic interpolation to 128x128, exactly the model's input), N
symbolic, and return (sr, heatmap) in NHWC.

How the ONNX graph is made: jax2onnx, which converts the jaxpr of the model's apply
function to ONNX operators directly (Conv, MatMul, Gather, Sigmoid, ...; no custom ops).
jax2tf + tf2onnx cannot: with this JAX, jax2tf emits one XlaCallModule op (StableHLO inside
a TensorFlow graph; native_serialization=False is deprecated and still emits it), which
tf2onnx has no conversion for. jax2onnx 0.13 and later pin orbax-checkpoint below 0.11.37
(moving this project's core pin back); 0.12.5 is the newest without that pin that runs on
this JAX, so the `export` extra pins it.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
from typing import Any, Iterator

import jax
import numpy as np

from spadnet_jax.data import contract
from spadnet_jax.serving import program_cache

ONNX, JAXEXPORT, MANIFEST = "model.onnx", "model.jaxexport", "export.json"
OPSET = 23
PLATFORMS = ("cpu", "cuda", "tpu")
TOLERANCE = 1e-4
HELD_BATCHES = (1, 3)
INPUT, OUTPUTS = "lr_up", ("sr", "heatmap")
EXTRA = ("jax2onnx", "onnx", "onnxruntime")
# The ops' per-platform forms (lax.platform_dependent) are fixed when tracing for ONNX, which
# has no platform switch: the GPU forms, plain array code with no loops.
ONNX_PLATFORM = "cuda"


class ExportUnavailable(RuntimeError):
  """The export extra is not installed."""


class ExportMismatch(ValueError):
  """An artifact does not reproduce the model within TOLERANCE."""


def require_extra() -> None:
  missing = [p for p in EXTRA if importlib.util.find_spec(p) is None]
  if missing:
    raise ExportUnavailable(f"exporting needs {', '.join(missing)}: install them with "
                            "`pip install -e .[export]`")


def check_exportable(model_config: dict[str, Any]) -> None:
  """ValueError naming the model field the export contract cannot express."""
  if not model_config.get("heatmap_branch", True):
    raise ValueError("model.heatmap_branch=False: the export contract's second output is the "
                     "heatmap, which this model does not predict")


def _apply(model: Any, variables: Any) -> Any:
  return lambda x: model.apply(variables, x)


def jax_program(model: Any, variables: Any) -> bytes:
  """model.jaxexport: the apply function with the weights as constants, batch symbolic."""
  (batch,) = jax.export.symbolic_shape("N")
  spec = jax.ShapeDtypeStruct((batch, contract.HR_SIZE, contract.HR_SIZE, 3), np.float32)
  return jax.export.export(jax.jit(_apply(model, variables)), platforms=PLATFORMS)(spec).serialize()


def _rename(graph: Any, old: str, new: str) -> None:
  for node in graph.node:
    node.input[:] = [new if n == old else n for n in node.input]
    node.output[:] = [new if n == old else n for n in node.output]
  for value in list(graph.input) + list(graph.output):
    if value.name == old:
      value.name = new


@contextlib.contextmanager
def _without_graph_passes() -> Iterator[None]:
  """jax2onnx without its graph clean-up passes, which look up each node's producer by
  scanning the node list: 10 minutes for the paper's x8 model against 12 s without them,
  for the same outputs (parity 6e-7 either way). The unused initializers they would drop
  are dropped after. (jax2onnx is pinned: this names one of its module attributes.)"""
  from jax2onnx.converter import conversion_api  # pylint: disable=import-outside-toplevel
  passes = conversion_api.optimize_graph
  conversion_api.optimize_graph = lambda graph: graph
  try:
    yield
  finally:
    conversion_api.optimize_graph = passes


def onnx_model(model: Any, variables: Any) -> bytes:
  """model.onnx: jax2onnx's graph of the apply function, input and outputs named by the
  contract. jax2onnx prints and logs as it converts: kept from the user's terminal."""
  from jax2onnx import to_onnx  # pylint: disable=import-outside-toplevel
  from spadnet_jax.ops import dispatch  # pylint: disable=import-outside-toplevel
  for name in ("jax2onnx", "onnx_ir"):
    logging.getLogger(name).setLevel(logging.ERROR)
  with contextlib.redirect_stdout(io.StringIO()), dispatch.traced_for(ONNX_PLATFORM), \
       _without_graph_passes():
    proto = to_onnx(_apply(model, variables), inputs=[("N", contract.HR_SIZE, contract.HR_SIZE, 3)],
                    model_name="spadnet", opset=OPSET)
  used = {name for node in proto.graph.node for name in node.input}
  kept = [t for t in proto.graph.initializer if t.name in used]
  del proto.graph.initializer[:]
  proto.graph.initializer.extend(kept)
  _rename(proto.graph, proto.graph.input[0].name, INPUT)
  for value, name in zip(list(proto.graph.output), OUTPUTS):
    _rename(proto.graph, value.name, name)
  return proto.SerializeToString()


def held_inputs(batch: int, scale: int) -> np.ndarray:
  """Fixed inputs of the parity check: random LR faces made into the model's input (Pillow's
  bicubic up to 128x128, the contract's resize)."""
  from spadnet_jax.data import degrade  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(batch)
  hr = rng.random((batch, contract.HR_SIZE, contract.HR_SIZE, 3)).astype(np.float32)
  return np.stack([degrade.degrade(h, scale)[1] for h in hr]).astype(np.float32)


def parity(model: Any, variables: Any, onnx_bytes: bytes, program: bytes) -> dict[str, Any]:
  """Both artifacts against the Flax model on held inputs at each of HELD_BATCHES: the
  largest absolute difference per artifact and output; ExportMismatch past TOLERANCE."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
  exported = jax.export.deserialize(program)
  reference = jax.jit(_apply(model, variables))
  figures: dict[str, Any] = {"tolerance": TOLERANCE, "batches": list(HELD_BATCHES)}
  for batch in HELD_BATCHES:
    x = held_inputs(batch, model.scale)
    want = [np.asarray(a) for a in reference(x)]
    got = {"onnx": session.run(list(OUTPUTS), {INPUT: x}),
           "jaxexport": [np.asarray(a) for a in exported.call(x)]}
    for artifact, outs in got.items():
      for name, w, g in zip(OUTPUTS, want, outs):
        same = g.shape == w.shape
        diff = float(np.max(np.abs(np.asarray(g, np.float64) - w))) if same else np.inf
        key = f"{artifact}_{name}_max_abs"
        figures[key] = max(figures.get(key, 0.0), diff)
        if not diff <= TOLERANCE:
          raise ExportMismatch(f"{artifact} output {name} at batch {batch} differs from the model "
                               f"by {diff:.3g} (shape {tuple(g.shape)}), more than {TOLERANCE:g}")
  return figures


def versions() -> dict[str, str]:
  out = {}
  for name in ("jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxruntime"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def is_export_folder(path: str) -> bool:
  """Whether `path` is a folder spadnet_jax.export wrote (its manifest and program)."""
  return all(os.path.isfile(os.path.join(path, name)) for name in (MANIFEST, JAXEXPORT))


def load_program(folder: str) -> program_cache.Program:
  """An export folder's model.jaxexport as predict's Program (no Flax model is built)."""
  with open(os.path.join(folder, MANIFEST)) as f:
    manifest = json.load(f)
  with open(os.path.join(folder, JAXEXPORT), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return program_cache.Program(lambda _, x: exported.call(x)[0], {}, manifest["model"],
                               int(manifest.get("step", 0)), cached=True)
