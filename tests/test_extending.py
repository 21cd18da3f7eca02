"""README's "Extending" recipes, done from outside the package: a new loss term, a new PAC
kernel and a new data source, each one registered function plus one config line, trained
together for two steps through train_and_evaluate."""
import csv
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from spadnet_jax import checkpoint, convert, losses, ops, trainer
from spadnet_jax.data import register_source, synthetic
from tests.train_helpers import tiny_config


@losses.register("test_edge_l1")
def edge_l1(outputs, batch):
  """L1 distance between the horizontal gradients of SR and HR."""
  grad = lambda x: x[:, :, 1:] - x[:, :, :-1]
  return jnp.mean(jnp.abs(grad(outputs["sr"]) - grad(batch["hr"])))


@ops.register_kernel("test_laplacian", params={"test_width": 1.0})
def laplacian_kernel(h, ksize, test_width):
  """exp(-|h_q - h_p| / width), with a learnable width."""
  return jnp.exp(-jnp.sqrt(ops.squared_distances(h, ksize) + 1e-6) / test_width)


@register_source("test_faces")
def faces_in_memory(cfg):
  """Sixteen training and six test faces drawn in memory: no tfds, no files."""
  def faces(first, count):
    return [dict(zip(("hr", "landmarks"), synthetic.draw_face(s)), filename=f"mem_{s}.png")
            for s in range(first, first + count)]
  return {"train": faces(0, 16), "test": faces(1000, 6)}


def test_three_registered_variants_train_through_the_trainer(tmp_path, capsys):
  cfg = tiny_config("", num_train_steps=2, checkpoint_every=2, **{
      "loss.test_edge_l1": 0.5,                      # the loss recipe's config line
      "model.pac_kernel": "test_laplacian",          # the PAC kernel's
      "data.name": "test_faces"})                    # the data source's
  summary = trainer.train_and_evaluate(cfg, str(tmp_path))
  out = capsys.readouterr().out
  # The loss term is computed, weighted and logged under its own name.
  line = re.search(r"^step 2/2 loss ([0-9.]+) \(heatmap_peak_l2 ([0-9.]+), sr_l1 ([0-9.]+), "
                   r"test_edge_l1 ([0-9.]+)\)", out, re.M)
  assert line, out
  total, hm, sr, edge = map(float, line.groups())
  assert total == pytest.approx(hm + sr + 0.5 * edge, abs=2e-4) and edge > 0
  # The kernel's learnable scalar is a parameter of every LSAC layer, and it was trained.
  params = checkpoint.read_items(str(tmp_path / "checkpoints"), 2, ("params",))["params"]["params"]
  widths = [float(np.asarray(v["lsac"]["test_width"])) for k, v in params.items() if "_hab" in k]
  assert widths and all(w != 1.0 and abs(w - 1.0) < 0.1 for w in widths), widths
  # The data source fed training and the final evaluation (its 6 test faces, by name).
  assert summary["num_images"] == 6 and summary["data"] == "test_faces"
  with open(tmp_path / "per_image.csv") as f:
    assert sorted(r["filename"] for r in csv.DictReader(f)) == [f"mem_{s}.png" for s in range(1000, 1006)]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["pac_kernel"] == "test_laplacian"
  # The official layout has no such kernel: the converter refuses it by name.
  model, variables, _ = checkpoint.load_model(str(tmp_path / "checkpoints"))
  with pytest.raises(ValueError, match=r"PAC kernel 'test_laplacian' has no official counterpart"):
    convert.to_official(model, variables)
  with pytest.raises(ValueError, match=r"parameter stage1_hab0/lsac/test_width has no counterpart"):
    convert.official_key(("stage1_hab0", "lsac", "test_width"), 3)


def test_registries_refuse_a_second_entry_of_the_same_name():
  with pytest.raises(ValueError, match="a loss term named 'sr_l1' is already registered"):
    losses.register("sr_l1")(edge_l1)
  with pytest.raises(ValueError, match="a PAC kernel named 'gaussian' is already registered"):
    ops.register_kernel("gaussian")(laplacian_kernel)
  with pytest.raises(ValueError, match="a data source named 'celeb_a' is already registered"):
    register_source("celeb_a")(faces_in_memory)
  with pytest.raises(ValueError, match="a PAC formulation named 'einsum' is already registered"):
    ops.register_formulation("einsum")(ops.pac_conv_einsum)
