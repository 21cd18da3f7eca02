"""Name -> variant tables for what researchers swap (loss terms, PAC kernels and
formulations, data sources): each name registered once, unknown names refused clearly."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
  """Registered variants of one kind, e.g. Registry('loss term')."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind

  def add(self, name: str, value: T) -> T:
    """Register `value` as `name`; a second entry of the same name is an error."""
    if name in self:
      raise ValueError(f"a {self.kind} named {name!r} is already registered")
    self[name] = value
    return value

  def lookup(self, name: str) -> T:
    """The variant registered as `name`; ValueError listing the registered names if none."""
    try:
      return self[name]
    except KeyError:
      raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}") from None
