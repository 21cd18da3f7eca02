"""benchmarks/tpu.py: the trainer's train step compiled ahead of time for a TPU slice with no
TPU present (libtpu from jax[tpu]), and its HLO reading on hand-made HLO text."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from benchmarks import tpu
from spadnet_jax import process_setup
from tests.train_helpers import REPO

_HLO = """HloModule jit_step
ENTRY %main {
  %ar = f32[32,256]{1,0:T(8,128)} all-reduce(%fusion.2), channel_id=2, replica_groups=[2,2]<=[4], to_apply=%add
  %ar.3 = (f32[512,512]{1,0}, bf16[512,256]{1,0}) all-reduce(%f.5, %f.7), replica_groups={{0,1,2,3}}, to_apply=%add
  %ag = f32[1024,256]{1,0} all-gather(%m.1), replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, dimensions={0}
  %rs = f32[64,256]{1,0} reduce-scatter(%g), replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  %ags = (bf16[16,8]{1,0}, bf16[64,8]{1,0}) all-gather-start(%x), replica_groups=[1,4]<=[4], dimensions={0}
  %agd = bf16[64,8]{1,0} all-gather-done(%ags)
  %add = f32[32,256]{1,0} add(%ar, %ar), metadata={op_name="jit(step)/all-reduce"}
}
"""


def test_collective_bytes_are_ring_traffic_per_chip():
  got = tpu.collective_bytes(_HLO)
  # all-reduce: 2(n-1)/n of each buffer; groups of 2 and of 4.
  assert got["all-reduce"] == {"count": 2, "bytes": 32 * 256 * 4 * 2 * 1 // 2
                               + int((512 * 512 * 4 + 512 * 256 * 2) * 2 * 3 / 4)}
  # all-gather: (n-1)/n of the gathered buffer; the mesh form's group is axis_0 (2); the
  # async pair counts once, by its result (bf16[64,8]), in a group of 4.
  assert got["all-gather"] == {"count": 2, "bytes": 1024 * 256 * 4 // 2 + 64 * 8 * 2 * 3 // 4}
  # reduce-scatter: the result is one shard of 4: (n-1)/n of the full buffer.
  assert got["reduce-scatter"] == {"count": 1, "bytes": 64 * 256 * 4 * 4 * 3 // 4}
  assert set(got) == {"all-reduce", "all-gather", "reduce-scatter"}


@pytest.mark.parametrize("curve, largest, compiled", [
    (lambda b: 1 + 0.1 * b, 144, [144, 152]),                  # linear: the prediction, then up
    (lambda b: 1 + 0.1 * b + 0.002 * b * b, 64, [80, 72, 64]),  # steeper: stepping down
])
def test_fit_batch_finds_the_largest_multiple_that_fits(monkeypatch, curve, largest, compiled):
  calls = []

  def compile_steps(cfg, topology, batch, eval_batch=0):
    calls.append(batch)
    return [{"batch_per_chip": batch, "peak_gib": curve(batch), "hbm_gib": 16,
             "fits": curve(batch) <= 16}]

  monkeypatch.setattr(tpu, "compile_steps", compile_steps)
  records = [compile_steps(None, "", 8)[0], compile_steps(None, "", 32)[0]]
  calls.clear()
  found = tpu.fit_batch(None, "v5e:2x2", records)
  assert (found["batch_per_chip"], found["fit"], calls) == (largest, "largest", compiled)
  assert curve(largest) <= 16 < curve(largest + 8)


def test_absent_tpu_placeholders_only_without_tpu_chips(tmp_path, monkeypatch):
  google = tmp_path / "pci" / "0000:00:04.0"
  google.mkdir(parents=True)
  (google / "vendor").write_text("0x1ae0\n")
  assert process_setup.tpu_chips_present(str(tmp_path / "pci"))
  assert not process_setup.tpu_chips_present(str(tmp_path / "none"))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
  monkeypatch.setattr(process_setup, "tpu_chips_present", lambda: False)
  env = {"TPU_WORKER_HOSTNAMES": "10.0.0.1"}
  process_setup.quiet_absent_tpu(env)
  assert env == {**process_setup.TPU_PLACEHOLDERS, "TPU_WORKER_HOSTNAMES": "10.0.0.1"}
  monkeypatch.setattr(process_setup, "tpu_chips_present", lambda: True)
  env = {}
  process_setup.quiet_absent_tpu(env)
  assert env == {}


def _libtpu_missing() -> str | None:
  if importlib.util.find_spec("libtpu") is None:
    return "libtpu is not installed: pip install -r requirements-test.txt (jax[tpu])"
  return None


def _libtpu_or_skip():
  msg = _libtpu_missing()
  if msg and os.environ.get("CI", "").lower() == "true":
    pytest.fail(msg)
  if msg:
    pytest.skip(msg)


_TINY_FSDP = """from tests import tiny_config

def get_config():
  c = tiny_config.get_config()
  c.model.scale = 4
  c.fsdp = 2
  # The tiny model's arrays are below the automatic FSDP threshold: shard the residual
  # blocks' conv kernels over their output channels by rule, as a researcher's rules would.
  c.partition_rules = ((r"conv[12]/kernel$", (None, None, None, "fsdp")),)
  return c
"""


class TinyCompile:
  """`python -m benchmarks.tpu` on a tiny config, running in the background."""

  def __init__(self):
    self.dir = pathlib.Path(tempfile.mkdtemp(prefix="spadnet_tpu_test_"))
    (self.dir / "tiny_fsdp.py").write_text(_TINY_FSDP)
    self.json = self.dir / "records.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.tpu", "--topology=v5e:2x2",
         f"--config={self.dir / 'tiny_fsdp.py'}", "--batch_per_chip=2",
         "--eval_batch_per_chip=0", f"--json={self.json}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def result(self, timeout: float = 900) -> tuple[int, str, str]:
    out, err = self.proc.communicate(timeout=timeout)
    return self.proc.returncode, out, err

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate()
    shutil.rmtree(self.dir, ignore_errors=True)


BACKGROUND = pytest.StashKey[TinyCompile]()


def start_tiny_compile() -> TinyCompile | None:
  """Started by conftest as soon as the test below is selected (None without libtpu)."""
  return None if _libtpu_missing() else TinyCompile()


@pytest.fixture
def tiny_tpu_compile(request) -> TinyCompile:
  _libtpu_or_skip()
  run = request.config.stash.get(BACKGROUND, None)
  return run if run is not None else TinyCompile()


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_v5e_2x2_slice(tiny_tpu_compile):
  """The CLI compiles the trainer's own step over a (data 2, fsdp 2) mesh of 4 abstract v5e
  chips: gradients are all-reduced over data, FSDP parameters gathered, memory reported."""
  code, out, err = tiny_tpu_compile.result()
  assert code == 0, out + err
  assert err == ""
  assert "compiled figures, not measured speed" in out
  [record] = json.loads(tiny_tpu_compile.json.read_text())
  assert (record["step"], record["topology"], record["chip"], record["chips"], record["fsdp"]) == \
      ("train", "v5e:2x2", "v5e", 4, 2)
  assert record["batch_per_chip"] == 2 and record["pac_impl"] == "fused"
  assert 0 < record["argument_gib"] and 0 < record["temp_gib"]
  assert record["peak_gib"] == pytest.approx(record["argument_gib"] + record["output_gib"]
                                             + record["temp_gib"] - record["alias_gib"])
  assert record["fits"] and record["gflops"] > 0 and record["roofline_ms"] > 0
  assert record["collectives"]["all-reduce"]["bytes"] > 0      # data-parallel gradients
  assert record["collectives"]["all-gather"]["bytes"] > 0      # FSDP-sharded kernels
  assert any(line.split()[:4] == ["train", "v5e:2x2", "2", "2"] for line in out.splitlines())


def test_unknown_topology_is_one_clear_error():
  _libtpu_or_skip()
  with pytest.raises(ValueError, match=r"--topology=v9z:1x1: not a TPU topology"):
    tpu.topology_devices("v9z:1x1")
