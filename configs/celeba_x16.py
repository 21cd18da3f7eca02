"""The paper's recipe on CelebA at x16 (official model/unet16.py: 4 stages)."""
from configs import celeba_x8


def get_config():
  return celeba_x8.get_config(scale=16)
