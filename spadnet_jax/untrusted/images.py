"""Decoding images with a visible bound on their size, and any colour mode to 8-bit RGB.

A PNG of 32 KB can declare 12000 x 12000 pixels: Pillow only warns below 179 million
pixels, and decoding it costs gigabytes. Here the size the header declares is checked
against the caller's limit before anything is decoded. Where the caller only needs a small
image (an LR face), a JPEG over the limit is decoded at 1/2, 1/4 or 1/8 scale by its
decoder (Pillow's draft mode), bounded memory instead of a refusal. 16-bit images are
scaled to 8 bits (Pillow's convert("RGB") clips them to 255); 32-bit float images, whose
range nobody knows, are refused.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 100_000_000           # a 100-megapixel photo: about 0.4 GB while decoded
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class Decoded(NamedTuple):
  image: Image.Image     # RGB, 8 bits per channel
  mode: str              # the file's own mode ('RGB', 'L', 'I;16', ...)
  note: str | None       # how it was decoded, when not as it is (a reduced JPEG)


def _megapixels(pixels: float) -> str:
  return f"{pixels / 1e6:.3g} megapixels"


def _too_large(path: str, size: tuple[int, int], max_pixels: float, limit: str) -> str:
  """The one-line refusal of an image of `size` (width, height) over a limit; `limit`
  names the setting."""
  width, height = size
  return (f"{path}: image is {width}x{height} ({_megapixels(width * height)}), over the "
          f"{_megapixels(max_pixels)} limit ({limit})")


def _open(path: str) -> Image.Image:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      return Image.open(path)
    except Image.DecompressionBombError as e:
      raise ValueError(f"{path}: image is over Pillow's own limit ({e})") from None
    except Exception as e:  # pylint: disable=broad-except  # Pillow raises many types
      raise ValueError(f"{path}: unreadable image ({e})") from None


def header_size(path: str) -> tuple[int, int]:
  """(width, height) as the file declares them, nothing decoded."""
  with _open(path) as im:
    return im.size


def _draft(im: Image.Image, max_pixels: float, min_side: int) -> int:
  """Ask a JPEG decoder for the least reduction (2, 4 or 8) that fits `max_pixels` and keeps
  `min_side`; the factor, or 1 when none does (or the file is not a JPEG)."""
  if im.format != "JPEG":
    return 1
  w, h = im.size
  for k in (2, 4, 8):
    size = (math.ceil(w / k), math.ceil(h / k))
    if size[0] * size[1] <= max_pixels and min(size) >= min_side:
      im.draft("RGB", size)
      return k
  return 1


def to_rgb(im: Image.Image, path: str) -> Image.Image:
  """8-bit RGB: 16-bit values scaled (x * 255 / 65535, rounded), alpha dropped."""
  if im.mode in SIXTEEN_BIT:
    values = np.asarray(im)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise ValueError(f"{path}: {im.mode} image holds values outside 0..65535; convert it "
                       "to 8 bits per channel")
    eight = (values.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(eight.astype(np.uint8), "L").convert("RGB")
  if im.mode == "F":
    raise ValueError(f"{path}: 32-bit floating-point image; its range is unknown: convert it "
                     "to 8 bits per channel")
  return im.convert("RGB")


def load_rgb(path: str, max_pixels: float, limit: str, *, min_side: int | None = None,
             upright: bool = False) -> Decoded:
  """Decode an image file to 8-bit RGB, refusing it (ValueError naming the file and its
  size) when its header declares more than `max_pixels`; `limit` names the setting.

  Args:
    path: the image file.
    max_pixels: the most pixels its header may declare.
    limit: the setting that holds `max_pixels`, for the message (e.g. '--max_pixels').
    min_side: when given, a JPEG over the limit is decoded reduced instead, as long as its
      shorter side keeps `min_side` pixels.
    upright: apply the EXIF orientation (photos).
  """
  with _open(path) as im:
    width, height = im.size
    note, factor = None, 1
    if width * height > max_pixels:
      factor = _draft(im, max_pixels, min_side) if min_side else 1
      if factor == 1:
        raise ValueError(_too_large(path, (width, height), max_pixels, limit))
      note = (f"decoded at 1/{factor} scale ({im.size[0]}x{im.size[1]}; the file is "
              f"{width}x{height}, over the {_megapixels(max_pixels)} limit ({limit}))")
    mode = im.mode
    try:
      im.load()
      image = ImageOps.exif_transpose(im) if upright else im
      return Decoded(to_rgb(image, path), mode, note)
    except ValueError as e:
      if str(e).startswith(path):
        raise
      raise ValueError(f"{path}: unreadable or truncated image ({e})") from None
    except Exception as e:  # pylint: disable=broad-except  # Pillow raises many types
      raise ValueError(f"{path}: unreadable or truncated image ({e})") from None
