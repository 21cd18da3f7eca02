"""Face SR data: registered sources, the data contract, LR synthesis and the grain pipeline.

The submodules and names below are imported when first used (PEP 562), so that a program
needing only LR synthesis (predict: `data.degrade`) does not import tfds with the builders.
"""
from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("builders", "contract", "degrade", "landmarks", "sources")
_NAMES = {"BadExample": "builders", "FaceFolder": "builders", "SyntheticFaces": "builders",
          "DataSource": "sources", "get_source": "sources", "register_source": "sources"}

__all__ = sorted([*_SUBMODULES, *_NAMES])


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
