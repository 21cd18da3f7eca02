"""Older configuration forms are upgraded in one place (config_upgrade), and only there."""
import json

import ml_collections
import pytest

from configs import default
from spadnet_jax import config_upgrade, losses, models, trainer


def test_todays_configuration_comes_back_equal():
  cfg = default.get_config()
  assert config_upgrade.upgrade_config(cfg, default.get_config()).to_dict() == cfg.to_dict()
  assert config_upgrade.upgrade_config(cfg).to_dict() == cfg.to_dict()


def test_a_config_json_written_before_fields_existed_gets_their_defaults():
  saved = default.get_config().to_dict()
  del saved["data"]["max_image_pixels"], saved["data"]["num_threads"], saved["metric_score"]
  del saved["model"]["remat"]
  old = ml_collections.ConfigDict(json.loads(json.dumps(saved)))
  new = config_upgrade.upgrade_config(old, default.get_config())
  assert new.data.max_image_pixels == 100_000_000 and new.data.num_threads == 2
  assert new.metric_score == "float" and new.model.remat == "none"
  assert "max_image_pixels" not in old.data          # the caller's copy is left as it was


@pytest.mark.parametrize("old,new", [(True, "all"), (False, "none")])
def test_boolean_remat_becomes_its_name(old, new):
  cfg = default.get_config()
  del cfg.model["remat"]
  cfg.model.remat = old
  assert config_upgrade.upgrade_config(cfg).model.remat == new
  assert models.from_config({**models.to_config(models.SPADNet()), "remat": old}).remat == new


def test_negative_hab_num_means_number_minus_one():
  cfg = default.get_config()
  cfg.model.hab_num = -1
  upgraded = config_upgrade.upgrade_config(cfg)
  assert upgraded.model.hab_num is None
  assert trainer.build_model(upgraded).num_habs == cfg.model.number - 1
  assert models.from_config({"number": 4, "hab_num": -1}).num_habs == 3


def test_heatmap_loss_weight_is_folded_into_the_heatmap_terms():
  cfg = default.get_config()
  cfg.loss.update(sr_l1=1.0, heatmap_l1=0.5, heatmap_peak_l2=0.0)
  cfg.heatmap_loss_weight = 4.0
  upgraded = config_upgrade.upgrade_config(cfg)
  assert upgraded.heatmap_loss_weight == 1.0
  assert losses.weights(upgraded) == {"sr_l1": 1.0, "heatmap_l1": 2.0}
  cfg.heatmap_loss_weight = float("nan")            # left for config_check to name
  assert config_upgrade.upgrade_config(cfg).heatmap_loss_weight != 1.0


def test_is_it_time_serves_every_period_and_the_last_step():
  assert [s for s in range(1, 13) if trainer.itstime(s, 5, 12)] == [5, 10, 12]
  assert [s for s in range(1, 11) if trainer.itstime(s, 5, 10)] == [5, 10]
