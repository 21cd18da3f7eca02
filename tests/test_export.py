"""The export command: ONNX and jax.export artifacts that run without this codebase."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import onnx
import pytest
from PIL import Image

from spadnet_jax import checkpoint, convert, export, models, predict
from spadnet_jax.serving import artifacts
from tests.conftest import REPO, fixture_path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  model = models.SPADNet(scale=8, n_feats=8, number=1, reduction=2, conv_impl="winograd")
  variables = jax.device_get(model.init(jax.random.key(0), model.example_input()))
  path = str(tmp_path_factory.mktemp("ck") / "ck")
  checkpoint.save_inference_checkpoint(path, model, variables, step=7)
  return path, model, variables


def test_export_writes_a_folder_both_of_whose_artifacts_reproduce_the_model(tiny_checkpoint,
                                                                           tmp_path):
  path, model, variables = tiny_checkpoint
  out = tmp_path / "exported"
  manifest = export.export(path, str(out))
  assert sorted(os.listdir(out)) == ["export.json", "model.jaxexport", "model.onnx"]
  assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())
  assert [p for p in os.listdir(tmp_path) if p != "exported"] == []     # no temporary left
  assert json.loads((out / "export.json").read_text()) == manifest
  assert manifest["step"] == 7 and manifest["scale"] == 8 and manifest["model"]["n_feats"] == 8
  assert manifest["model"]["conv_impl"] == "xla"     # portable: not the checkpoint's Winograd
  assert manifest["input"]["name"] == "lr_up" and manifest["input"]["shape"] == ["N", 128, 128, 3]
  assert [o["name"] for o in manifest["outputs"]] == ["sr", "heatmap"]
  assert manifest["onnx_opset"] == 23 and manifest["jaxexport_platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["versions"]["jax2onnx"] == "0.12.5"
  for key in ("onnx_sr_max_abs", "onnx_heatmap_max_abs", "jaxexport_sr_max_abs",
              "jaxexport_heatmap_max_abs"):
    assert 0 <= manifest["parity"][key] <= 1e-4, key
  graph = onnx.load(str(out / "model.onnx")).graph
  assert [i.name for i in graph.input] == ["lr_up"]
  assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [
      "N", 128, 128, 3]
  assert [o.name for o in graph.output] == ["sr", "heatmap"]
  assert {n.domain for n in graph.node} <= {"", "ai.onnx"}            # standard operators only
  onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
  # The jaxexport runs at a batch the parity check did not use.
  x = artifacts.held_inputs(2, 8)
  got = jax.export.deserialize(bytearray((out / "model.jaxexport").read_bytes())).call(x)
  for g, w in zip(got, model.apply(variables, x)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_overwrite_replaces_a_folder_and_its_absence_refuses(tiny_checkpoint, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "mine.txt").write_text("keep")
  with pytest.raises(ValueError, match=rf"^--output {out} exists and is not empty; choose a new "
                     "folder or pass --overwrite$"):
    export.export(tiny_checkpoint[0], str(out))
  assert os.listdir(out) == ["mine.txt"]
  export.export(tiny_checkpoint[0], str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ["export.json", "model.jaxexport", "model.onnx"]
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_bad_inputs_are_one_line_and_create_nothing(tiny_checkpoint, tmp_path, monkeypatch):
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match="holds no checkpoint steps"):
    export.export(str(tmp_path), str(out))
  afile = tmp_path / "file"
  afile.write_text("x")
  with pytest.raises(PermissionError, match=f"cannot write into {afile}"):
    export.export(tiny_checkpoint[0], str(afile / "out"))
  model = models.SPADNet(scale=8, n_feats=4, number=1, reduction=2, heatmap_branch=False)
  variables = jax.device_get(model.init(jax.random.key(0), model.example_input()))
  checkpoint.save_inference_checkpoint(str(tmp_path / "noheat"), model, variables)
  with pytest.raises(ValueError, match=r"^model.heatmap_branch=False: the export contract"):
    export.export(str(tmp_path / "noheat"), str(out))
  real = artifacts.importlib.util.find_spec
  monkeypatch.setattr(artifacts.importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax2onnx" else real(name, *a))
  with pytest.raises(artifacts.ExportUnavailable,
                     match=r"^exporting needs jax2onnx: install them with "
                           r"`pip install -e .\[export\]`$"):
    export.export(tiny_checkpoint[0], str(out))
  assert sorted(os.listdir(tmp_path)) == ["file", "noheat"]


def test_a_failed_parity_check_names_the_output_and_writes_nothing(tiny_checkpoint, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setattr(artifacts, "TOLERANCE", 0.0)       # ONNX's float round-off then fails
  with pytest.raises(artifacts.ExportMismatch,
                     match=r"^onnx output sr at batch 1 differs from the model by [0-9.e-]+ "
                           r"\(shape \(1, 128, 128, 3\)\), more than 0$"):
    export.export(tiny_checkpoint[0], str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


def test_predict_runs_an_export_folder_as_it_runs_the_checkpoint(tiny_checkpoint, tmp_path):
  out = tmp_path / "exported"
  export.export(tiny_checkpoint[0], str(out))
  faces = tmp_path / "faces"
  faces.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(faces / f"f{i}.png")
  assert predict.predict(tiny_checkpoint[0], str(faces), str(tmp_path / "a")) == 0
  assert predict.predict(str(out), str(faces), str(tmp_path / "b")) == 0
  for i in range(3):
    a = np.asarray(Image.open(tmp_path / "a" / f"f{i}.png"))
    b = np.asarray(Image.open(tmp_path / "b" / f"f{i}.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# --- the official model, run where this codebase cannot be imported --------------------------

BLOCK = ("import sys\n"
         "class _Blocked:\n"
         "  def find_spec(self, name, path=None, target=None):\n"
         "    if name.split('.')[0] in {blocked!r}:\n"
         "      raise ImportError(f'{{name}} is blocked in this test')\n"
         "sys.meta_path.insert(0, _Blocked())\n")


@pytest.fixture(scope="module")
def official_export(tmp_path_factory):
  fixture = np.load(fixture_path("official_x8"))
  model, variables = convert.from_official(convert.load_state_dict(fixture_path("official_x8")),
                                           gsac_gate="official")
  root = tmp_path_factory.mktemp("official")
  checkpoint.save_inference_checkpoint(str(root / "ck"), model, variables)
  export.export(str(root / "ck"), str(root / "export"))
  x = fixture["input"].transpose(0, 2, 3, 1)
  sr, hm = fixture["sr"].transpose(0, 2, 3, 1), fixture["heatmap"].transpose(0, 2, 3, 1)
  take = {1: [0], 2: [0, 1], 3: [0, 1, 0]}
  cases = {b: (x[i], sr[i], hm[i]) for b, i in take.items()}
  np.savez(root / "cases.npz", **{f"{k}{b}": v for b, c in cases.items() for k, v in zip("xsh", c)})
  return root


def _run_blocked(code: str, blocked: tuple[str, ...], cwd) -> str:
  r = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=set(blocked)) + code],
                     cwd=cwd, capture_output=True, text=True, timeout=600,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stdout + r.stderr
  return r.stdout


CHECK = """
import numpy as np
cases = np.load("cases.npz")
for b in (1, 2, 3):
  sr, hm = run(cases[f"x{b}"])
  assert sr.shape == (b, 128, 128, 3) and hm.shape == (b, 128, 128, 5)
  print(b, float(np.abs(sr - cases[f"s{b}"]).max()), float(np.abs(hm - cases[f"h{b}"]).max()))
"""


def _figures(out: str) -> list[float]:
  rows = [line.split() for line in out.strip().splitlines()]
  assert [r[0] for r in rows] == ["1", "2", "3"]
  return [float(v) for r in rows for v in r[1:]]


@pytest.mark.slow
def test_onnx_reproduces_the_official_outputs_in_onnxruntime_without_jax(official_export):
  code = ("import onnxruntime as ort\n"
          "s = ort.InferenceSession('export/model.onnx', providers=['CPUExecutionProvider'])\n"
          "run = lambda x: s.run(['sr', 'heatmap'], {'lr_up': x})\n" + CHECK +
          "import sys; assert 'jax' not in sys.modules\n")
  assert max(_figures(_run_blocked(code, ("jax", "jaxlib", "flax", "spadnet_jax"),
                                   official_export))) <= 1e-4


@pytest.mark.slow
def test_jaxexport_reproduces_the_official_outputs_with_plain_jax(official_export):
  code = ("import jax\n"
          "exp = jax.export.deserialize(bytearray(open('export/model.jaxexport', 'rb').read()))\n"
          "run = lambda x: [np.asarray(a) for a in exp.call(x)]\n" + CHECK.replace(
              "import numpy as np\n", "") + "import sys; assert 'flax' not in sys.modules\n")
  code = "import numpy as np\n" + code
  assert max(_figures(_run_blocked(code, ("flax", "spadnet_jax"), official_export))) <= 1e-4


@pytest.mark.slow
def test_the_readme_onnxruntime_snippet_runs_as_written(official_export):
  readme = (REPO / "README.md").read_text()
  snippet = re.search(r"<!-- onnx-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
  face = Image.open(REPO / "docs" / "restored_photo.png").convert("RGB").resize((16, 16))
  face.save(official_export / "face.png")
  _run_blocked(snippet, ("jax", "flax", "spadnet_jax"), official_export)
  out = np.asarray(Image.open(official_export / "face_sr.png"))
  assert out.shape == (128, 128, 3) and out.std() > 1
