"""Train SPADNet: python train.py [--config configs/X.py] [--workdir DIR] [--config.FIELD=V].

With no arguments it trains the embedded default (synthetic faces) into ./workdir. Running
the same command again resumes from the newest intact checkpoint there (--step N: from
step N). Exit status: 0 done, 1 error (one line; --verbosity=1 for the traceback),
75 preempted (a checkpoint was saved: rerun the same command to resume).
"""
from absl import app, flags
from ml_collections import config_flags

from spadnet_jax import cli, preemption, process_setup

DEFAULT_CONFIG = "configs/default.py"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "./workdir", "Checkpoints, TensorBoard events and metrics.json.")
flags.DEFINE_integer("step", None, "Resume from this checkpoint step instead of the newest "
                     "intact one (newer steps are moved to checkpoints.set_aside/).")
process_setup.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from configs import default  # pylint: disable=import-outside-toplevel
  from spadnet_jax import config_upgrade, trainer  # pylint: disable=import-outside-toplevel  # after set-up
  cfg = config_upgrade.upgrade_config(FLAGS.config, default.get_config())
  result = trainer.train_and_evaluate(cfg, FLAGS.workdir, step=FLAGS.step)
  return preemption.EXIT_CODE if "preempted_at" in result else 0


if __name__ == "__main__":
  cli.run(main, DEFAULT_CONFIG, preemptible=True)
