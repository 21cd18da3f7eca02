"""The paper's recipe on Helen (FSRNet split, folder layout), x8."""
from configs import celeba_x8


def get_config():
  c = celeba_x8.get_config(scale=8, data="face_folder/helen")
  c.eval_batch_size = 10            # Helen's test split has 50 faces
  c.num_eval_images = 50
  return c
