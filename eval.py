"""Evaluate a checkpoint: python eval.py --workdir W | --checkpoint PATH [--config.FIELD=V].

Reads the latest checkpoint of W (or PATH: a training checkpoint folder, one step, or a
converter output), evaluates the configured test split and writes W/eval/<step>/:
metrics.json, per_image.csv, sr/*.png and grids/*.png. The data configuration comes from
--config, else W/config.json (written by train.py), else configs/default.py.
Checkpoints are verified against their checksums: a damaged newest step is reported and
the previous intact one evaluated; a damaged --step fails. Exit status 1 (one line) on a
user error or when a summary metric is not finite.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from spadnet_jax import cli, process_setup

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file (its data and eval fields).",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Training workdir: checkpoints/ inside, results to eval/.")
flags.DEFINE_string("checkpoint", None, "A checkpoint folder instead of --workdir's latest.")
flags.DEFINE_integer("step", None, "Evaluate this step instead of the newest intact one.")
flags.DEFINE_string("split", None, "Data split (default: config.data.eval_split).")
flags.DEFINE_enum("score", None, ["float", "png"], "Score the float output (official) or the "
                  "8-bit PNG (default: config.metric_score).")
flags.DEFINE_integer("batch_size", None, "Global eval batch (default: config.eval_batch_size).")
flags.DEFINE_integer("num_images", -1, "Evaluate only the first N images (-1: all).")
flags.DEFINE_integer("num_grids", 8, "Comparison grids to write.")
flags.DEFINE_bool("save_images", True, "Write the SR PNGs.")
process_setup.define_distributed_flags()


def _config():
  """--config, else the run's config.json (written by train.py, perhaps by an older version:
  upgraded to today's form), else configs/default.py."""
  import ml_collections
  from configs import default
  from spadnet_jax import config_upgrade
  if FLAGS.config is not None:
    return config_upgrade.upgrade_config(FLAGS.config, default.get_config())
  from spadnet_jax.storage import paths
  path = paths.resolve(FLAGS.workdir, "--workdir") / "config.json" if FLAGS.workdir else None
  if path is not None and path.is_file():
    try:
      saved = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"{path} is not a configuration train.py wrote ({e})") from None
    if not isinstance(saved, dict):
      raise ValueError(f"{path} is not a configuration train.py wrote (a JSON object)")
    return config_upgrade.upgrade_config(ml_collections.ConfigDict(saved), default.get_config())
  return default.get_config()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir and not FLAGS.checkpoint:
    raise app.UsageError("give --workdir or --checkpoint")
  from spadnet_jax import evaluation  # pylint: disable=import-outside-toplevel  # after set-up
  cfg = _config()
  from spadnet_jax.storage import paths  # pylint: disable=import-outside-toplevel
  source = (paths.resolve(FLAGS.checkpoint, "--checkpoint") if FLAGS.checkpoint
            else paths.resolve(FLAGS.workdir, "--workdir") / "checkpoints")
  evaluation.evaluate_checkpoint(cfg, source, out_root=FLAGS.workdir or source, request=(
      evaluation.EvalRequest(split=FLAGS.split or cfg.data.eval_split,
                             score=FLAGS.score or cfg.metric_score,
                             batch_size=FLAGS.batch_size or cfg.eval_batch_size, step=FLAGS.step,
                             num_images=FLAGS.num_images, num_grids=FLAGS.num_grids,
                             save_images=FLAGS.save_images)))
  return 0


if __name__ == "__main__":
  cli.run(main)
