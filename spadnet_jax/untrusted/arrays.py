"""Reading .npz archives of arrays with every declared size checked before it is allocated.

`np.load` refuses pickled (object) arrays by default, but it allocates each member from the
shape its header declares before reading the bytes: a few hundred bytes declaring a
(100000, 100000) array cost 40 GB of address space. Here each member's header is read
first and its declared size checked against the bytes the archive holds for it and a total
bound; only then is it read.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

MAX_TOTAL_BYTES = 4 << 30   # the paper's SPADNet is 30 MB of float32


def _declared(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> int:
  """Bytes the member's .npy header says its data takes; ValueError for a bad header."""
  with archive.open(info) as f:
    try:
      version = np.lib.format.read_magic(f)
      shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                         else np.lib.format.read_array_header_2_0(f))
    except ValueError as e:
      raise ValueError(f"{path}: member {info.filename} is not an array ({e})") from None
  if dtype.hasobject:
    raise ValueError(f"{path}: member {info.filename} holds Python objects, not numbers")
  nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
  if nbytes > info.file_size:
    raise ValueError(f"{path}: member {info.filename} declares {shape} {dtype} "
                     f"({nbytes:,} bytes) but holds {info.file_size:,} bytes")
  return nbytes


def load_npz(path: str, max_bytes: int = MAX_TOTAL_BYTES) -> dict[str, np.ndarray]:
  """Every array of an .npz as {name: array}; ValueError naming the file and the member
  whose declared size is inconsistent, or when they add up to more than `max_bytes`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  try:
    with zipfile.ZipFile(path) as archive:
      members = [i for i in archive.infolist() if i.filename.endswith(".npy")]
      total = sum(_declared(archive, i, path) for i in members)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"{path} cannot be read as an .npz of arrays ({e})") from None
  if total > max_bytes:
    raise ValueError(f"{path}: its arrays declare {total:,} bytes, over the "
                     f"{max_bytes:,} this reader accepts")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} cannot be read as an .npz of arrays ({type(e).__name__})") from None
