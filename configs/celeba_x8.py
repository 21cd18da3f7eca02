"""The paper's recipe on CelebA (DIC split, folder layout), x8: L1 on image and heatmaps,
Adam 1e-4, betas (0.9, 0.99), eps 1e-8, batch 8, learning rate halved at epochs 10, 20,
30, 40, 50.

python train.py --config configs/celeba_x8.py --config.data.manual_dir=/path/to/celeba
"""
from configs import default


def get_config(scale: int = 8, data: str = "face_folder/celeba"):
  c = default.get_config()
  c.model.update(scale=scale, n_feats=64, number=6, reduction=16)
  c.data.update(name=data, augment_flip=True, augment_rot90=True)
  c.batch_size = 8
  c.num_train_steps = -1
  c.num_epochs = 60.0
  c.loss.update(sr_l1=1.0, heatmap_l1=1.0, heatmap_l2=0.0, heatmap_peak_l2=0.0)  # the paper's
  c.optimizer.update(learning_rate=1e-4, decay_epochs=(10.0, 20.0, 30.0, 40.0, 50.0))
  c.log_every = 200
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.eval_batch_size = 40
  c.num_eval_images = 200
  return c
