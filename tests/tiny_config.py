"""The tiny training configuration of the tests, as a config file for train.py."""
from tests import train_helpers


def get_config():
  return train_helpers.tiny_config(data_dir="")
