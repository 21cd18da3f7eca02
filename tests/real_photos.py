"""Real photos that installed packages ship (no face data set can be downloaded here):
scikit-image's astronaut (Eileen Collins) and coffee, matplotlib's Grace Hopper."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image


def astronaut() -> np.ndarray:
  from skimage import data  # pylint: disable=import-outside-toplevel
  return data.astronaut()


def coffee() -> np.ndarray:
  from skimage import data  # pylint: disable=import-outside-toplevel
  return data.coffee()


def hopper() -> np.ndarray:
  """matplotlib's sample photo, read without importing matplotlib."""
  spec = importlib.util.find_spec("matplotlib")
  path = (os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "sample_data",
                       "grace_hopper.jpg") if spec else "")
  if not os.path.isfile(path):
    msg = f"matplotlib's grace_hopper.jpg is absent ({path or 'matplotlib not installed'})"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def resized(image: np.ndarray, width: int, height: int | None = None) -> np.ndarray:
  height = height or round(image.shape[0] * width / image.shape[1])
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def side_by_side(*images: np.ndarray) -> np.ndarray:
  """Photos of one height in a row: a photo with several faces."""
  return np.concatenate(images, axis=1)
