"""Embedded default: synthetic faces, x8, a SPADNet small enough for a 2-core CPU.

python train.py trains it in about ten minutes on such a machine; every field can be
overridden on the command line, e.g. --config.batch_size=16 --config.model.n_feats=32.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      scale=8, n_feats=16, number=2, hab_num=placeholder(int), reduction=4,  # None: number - 1
      pac_kernel="gaussian", pac_impl="auto", gsac_gate="official", use_lsac=True,
      use_gsac=True, heatmap_branch=True, remat="none", dtype="float32"))

  c.data = ml_collections.ConfigDict(dict(
      name="synthetic_faces", data_dir="", manual_dir="", train_split="train",
      eval_split="test", lr_kernel="pil", augment_flip=True, augment_rot90=False,
      skip_bad_examples=False, num_threads=2, prefetch=4))

  c.batch_size = 8
  c.num_train_steps = 1500          # > 0 wins over num_epochs
  c.num_epochs = 0.0
  # Loss terms (spadnet_jax.losses) and their weights; 0 leaves a term out.
  c.loss = ml_collections.ConfigDict(dict(sr_l1=1.0, heatmap_l1=1.0, heatmap_l2=0.0))
  c.heatmap_loss_weight = 1.0       # scales every heatmap_* term (older configurations' field)
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, b1=0.9, b2=0.99, eps=1e-8, decay_epochs=(3.0, 4.0), decay_factor=0.5,
      grad_clip=0.0, ema_decay=0.0))

  c.fsdp = 1                        # devices per parameter shard (1: pure data parallel)
  c.partition_rules = ()            # ((regex, PartitionSpec tuple | 'fsdp_auto'), ...)
  c.nonfinite = "stop"              # or "skip": drop the update and count it
  c.max_skipped_fraction = 0.01     # nonfinite='skip': a run that skipped more fails at the end
  c.preemption_sync_every = 10      # steps between the processes' stop-flag agreement (multi-process)
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.eval_batch_size = 20
  c.num_eval_images = 100           # periodic evaluation; the final one uses the whole split
  c.num_grid_images = 4
  c.metric_score = "float"          # 'float' (official) or 'png' (8-bit output)
  c.profile_steps = 0
  return c
