"""The exported SR program and predict's cache of programs per checkpoint: same outputs as
the Flax model, loaded instead of rebuilt, never stale, never trusted when damaged."""
import json
import os

import jax
import numpy as np
import pytest

from spadnet_jax import checkpoint, models, predict
from spadnet_jax.serving import exported, program_cache


@pytest.fixture(name="tiny")
def _tiny(tmp_path, monkeypatch):
  monkeypatch.setenv("SPADNET_CACHE_DIR", str(tmp_path / "cache"))
  model = models.SPADNet(scale=8, n_feats=4, number=2, reduction=2, pac_impl="fused")
  variables = model.init(jax.random.key(0), model.example_input())
  ckpt = tmp_path / "ckpt"
  checkpoint.save_inference_checkpoint(str(ckpt), model, variables)
  return model, variables, ckpt


def _images(n: int) -> np.ndarray:
  return np.random.default_rng(0).random((n, 128, 128, 3), np.float32)


def test_batch_plan_uses_one_shape_and_pads_less_than_one_image_per_batch():
  assert predict.batch_plan(10, 8) == 5         # two batches of 5, not 8 + 8 (6 padding)
  assert predict.batch_plan(3, 8) == 3
  assert predict.batch_plan(16, 8) == 8
  assert predict.batch_plan(17, 8) == 6         # three batches, one padding image
  for count in range(1, 40):
    for size in (1, 3, 8):
      b = predict.batch_plan(count, size)
      batches = -(-count // b)
      assert b <= size and batches == -(-count // size) and batches * b - count < batches


def test_a_batch_size_below_one_is_refused_in_one_line(tmp_path, capsys):
  assert predict.main(["--checkpoint", str(tmp_path), "--input", str(tmp_path), "--output",
                       str(tmp_path / "out"), "--batch_size", "0"]) != 0
  assert capsys.readouterr().err.strip() == "error: --batch_size 0: must be at least 1"


def test_exported_program_matches_the_model_at_any_batch_size(tiny):
  model, variables, _ = tiny
  program = jax.export.deserialize(exported.export_sr(model, variables).serialize())
  for n in (1, 3):
    x = _images(n)
    want = model.apply(variables, x)[0]
    np.testing.assert_allclose(jax.jit(program.call)(variables, x), want, atol=1e-5)
  flat = exported.flat_variables(variables)
  assert "params/head/kernel" in flat
  assert jax.tree_util.tree_structure(exported.nested_variables(flat)) == \
      jax.tree_util.tree_structure(variables)


def test_the_second_load_comes_from_the_cache_with_the_same_weights(tiny):
  model, variables, ckpt = tiny
  first = program_cache.load(str(ckpt), report=lambda _: None)
  second = program_cache.load(str(ckpt), report=lambda _: None)
  assert (first.cached, second.cached) == (False, True)
  assert second.step == 0 and second.model_config == models.to_config(model)
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(second.variables)):
    np.testing.assert_array_equal(a, b)
  x = _images(2)
  np.testing.assert_array_equal(jax.jit(first.call)(first.variables, x),
                                jax.jit(second.call)(second.variables, x))


def test_a_changed_checkpoint_is_never_served_from_the_cache(tiny):
  model, variables, ckpt = tiny
  program_cache.load(str(ckpt), report=lambda _: None)
  key = program_cache.entry_key(*program_cache.step_of(str(ckpt)))
  other = jax.tree_util.tree_map(lambda a: a + 1, variables)
  checkpoint.save_inference_checkpoint(str(ckpt), model, other, step=5)   # a newer step
  assert program_cache.step_of(str(ckpt))[1] == 5
  assert program_cache.entry_key(*program_cache.step_of(str(ckpt))) != key
  newer = program_cache.load(str(ckpt), report=lambda _: None)
  assert not newer.cached and newer.step == 5
  np.testing.assert_array_equal(newer.variables["params"]["head"]["bias"],
                                np.asarray(other["params"]["head"]["bias"]))
  # Bytes of the cached step's weights changed on disk: its checksums fail, so no cache entry
  # is used and the checkpoint loader refuses the step by name.
  params = ckpt / "5" / "params"
  data = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  assert program_cache.step_of(str(ckpt / "5")) is None
  with pytest.raises(checkpoint.DamagedCheckpoint, match="does not match its checksum"):
    program_cache.load(str(ckpt / "5"), report=lambda _: None)


def test_a_damaged_cache_entry_is_deleted_and_rebuilt(tiny):
  _, variables, ckpt = tiny
  program_cache.load(str(ckpt), report=lambda _: None)
  entry = os.path.join(program_cache.programs_dir(), os.listdir(program_cache.programs_dir())[0])
  weights = os.path.join(entry, "weights.npz")
  raw = bytearray(open(weights, "rb").read())
  raw[-100] ^= 0xFF
  with open(weights, "wb") as f:
    f.write(bytes(raw))
  assert program_cache.load_entry(entry) is None and not os.path.exists(entry)
  rebuilt = program_cache.load(str(ckpt), report=lambda _: None)
  assert not rebuilt.cached and program_cache.load(str(ckpt), report=lambda _: None).cached
  manifest = json.load(open(os.path.join(entry, "manifest.json")))
  assert set(manifest["files"]) == set(program_cache.FILES)
  np.testing.assert_array_equal(rebuilt.variables["params"]["head"]["kernel"],
                                np.asarray(variables["params"]["head"]["kernel"]))


def test_old_entries_and_dead_temporaries_are_removed_least_recently_used_first(tmp_path):
  for i in range(5):
    (tmp_path / f"e{i}").mkdir()
    os.utime(tmp_path / f"e{i}", (1000 + i, 1000 + i))
  os.utime(tmp_path / "e0", (5000, 5000))                   # used most recently
  (tmp_path / ".writing-dead").mkdir()                        # left by a process that died
  os.utime(tmp_path / ".writing-dead", (1000, 1000))
  (tmp_path / ".writing-busy").mkdir()                        # being written now
  program_cache.prune(str(tmp_path), keep=2)
  assert sorted(os.listdir(tmp_path)) == [".writing-busy", "e0", "e4"]


def test_a_source_change_changes_the_key(tiny, monkeypatch):
  _, _, ckpt = tiny
  found = program_cache.step_of(str(ckpt))
  key = program_cache.entry_key(*found)
  monkeypatch.setattr(program_cache, "source_digest", lambda: "edited layer")
  assert program_cache.entry_key(*found) != key
