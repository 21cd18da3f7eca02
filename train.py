"""Train SPADNet: python train.py [--config configs/X.py] [--workdir DIR] [--config.FIELD=V].

With no arguments it trains the embedded default (synthetic faces) into ./workdir. Running
the same command again resumes from the latest checkpoint there.
"""
from absl import app, flags
from ml_collections import config_flags

from spadnet_jax import distributed, platform

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "./workdir", "Checkpoints, TensorBoard events and metrics.json.")
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  platform.configure_xla_cpu()
  distributed.initialize_from_flags()
  from spadnet_jax import trainer  # after jax.distributed.initialize
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  platform.restart_with_malloc_tunables()   # the program itself only, never an importer
  app.run(main)
