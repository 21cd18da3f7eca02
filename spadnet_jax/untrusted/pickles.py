"""Unpickling landmark files with an allowlist: dicts, lists, tuples, strings, numbers and
NumPy arrays, nothing that can run code.

`pickle.load` calls whatever callable a file names (a `__reduce__` returning os.system
runs a command); here `find_class` admits only the callables that pickled NumPy arrays,
dtypes and scalars are rebuilt with, under both NumPy 1's (`numpy.core`) and NumPy 2's
(`numpy._core`) module paths, plus what Python 2 pickles (read as latin-1) and protocols
0-5 use. Each admitted callable is wrapped so that it cannot allocate more than the file
carries: an array is rebuilt from the bytes in the file, never from a declared shape alone.
Anything else is refused by its module and name before it is looked up.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
from typing import Any, Callable

import numpy as np

MAX_FILE_BYTES = 1 << 30   # CelebA's 168,854 training faces take about 100 MB
_NUMERIC_KINDS = "biuf"    # bool, signed and unsigned integers, floats
_EMPTY_SHAPE_LIMIT = 1 << 16


class _NdarrayType:
  """Stands for numpy.ndarray where a pickle names it: only _reconstruct may receive it, so a
  pickle cannot call ndarray(shape) to allocate an array of a declared size."""

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    raise pickle.UnpicklingError("refused to call numpy.ndarray directly")


_NDARRAY = _NdarrayType()


def _dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
  dtype = np.dtype(spec, align, copy) if isinstance(spec, (str, bytes)) else None
  if dtype is None or dtype.kind not in _NUMERIC_KINDS or dtype.fields or dtype.subdtype:
    raise pickle.UnpicklingError(f"refused the array type {spec!r}: a landmark file holds "
                                 "numbers")
  return dtype


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  """NumPy's pickled arrays start empty (shape (0,)) and get their bytes from the file."""
  if subtype is not _NDARRAY:
    raise pickle.UnpicklingError("refused to rebuild an array of another type than ndarray")
  if not isinstance(shape, tuple) or math.prod(int(n) for n in shape) > _EMPTY_SHAPE_LIMIT:
    raise pickle.UnpicklingError(f"refused an array declared with shape {shape!r} before "
                                 "its data")
  return np.ndarray(shape, _dtype(dtype))


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
  """Protocol 5's arrays: a view of bytes the file holds, reshaped (sizes must agree)."""
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
    raise pickle.UnpicklingError(f"refused the array type {dtype!r}")
  return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()


def _scalar(dtype: Any, data: Any = None) -> Any:
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
    raise pickle.UnpicklingError(f"refused the scalar type {dtype!r}")
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise pickle.UnpicklingError("refused a scalar whose bytes do not match its type")
  return np.frombuffer(data, dtype)[0]


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
  """Protocols 0-2 store bytes (an array's data) as latin-1 text and call _codecs.encode."""
  if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("refused _codecs.encode of anything but latin-1 text")
  return text.encode("latin-1")


_NUMPY_CORE = ("numpy.core", "numpy._core")
ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(f"{core}.multiarray", "_reconstruct"): _reconstruct for core in _NUMPY_CORE},
    **{(f"{core}.multiarray", "scalar"): _scalar for core in _NUMPY_CORE},
    **{(f"{core}.numeric", "_frombuffer"): _frombuffer for core in _NUMPY_CORE},
}


class _DataOnly(pickle.Unpickler):

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED[(module, name)]
    except KeyError:
      raise _Refused(f"{module}.{name}") from None


class _Refused(pickle.UnpicklingError):
  """A class or function outside ALLOWED; its text is the dotted name."""


def _checked(obj: Any) -> Any:
  """`obj`, once every array in it has a plain numeric dtype (a pickle may still edit a
  dtype's state after _dtype admitted it) and nothing else but containers, text and numbers."""
  todo = [obj]
  while todo:
    x = todo.pop()
    if isinstance(x, dict):
      todo += list(x.keys()) + list(x.values())
    elif isinstance(x, (list, tuple)):
      todo += list(x)
    elif isinstance(x, np.ndarray):
      if x.dtype.kind not in _NUMERIC_KINDS or x.dtype.fields or x.dtype.subdtype:
        raise _Refused(f"an array of type {x.dtype}")
    elif not isinstance(x, (str, bytes, int, float, complex, bool, np.generic, type(None))):
      raise _Refused(type(x).__name__)
  return obj


def load(path: str, what: str = "a landmark file holds only arrays, lists and dicts") -> Any:
  """The data a pickle file holds, or ValueError naming the file and the problem.

  `what` ends the refusal message: what files of this kind hold. Python 2 pickles are
  read as latin-1, as NumPy's own pickles of that era need.
  """
  size = os.path.getsize(path)
  if size > MAX_FILE_BYTES:
    raise ValueError(f"{path}: {size:,} bytes, over the {MAX_FILE_BYTES >> 20:,} MiB a "
                     "landmark file may take")
  with open(path, "rb") as f:
    data = f.read(MAX_FILE_BYTES + 1)
  try:
    return _checked(_DataOnly(io.BytesIO(data), encoding="latin1").load())
  except _Refused as e:
    raise ValueError(f"{path}: refused to load {e}: {what}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
          KeyError, MemoryError, OverflowError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot be read as a landmark pickle ({type(e).__name__}: "
                     f"{str(e)[:200]})") from None
