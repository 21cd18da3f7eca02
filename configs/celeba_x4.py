"""The paper's recipe on CelebA at x4 (official model/unet4.py: 2 stages)."""
from configs import celeba_x8


def get_config():
  return celeba_x8.get_config(scale=4)
