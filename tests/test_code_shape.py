"""The code's own shape, as ../STYLE.md sets it: small signatures with type hints, an Args
block where a public entry point takes many parameters, defaults read from the config."""
import ast
import pathlib
import re

import pytest

from tests.conftest import REPO

SOURCES = sorted((REPO / "spadnet_jax").rglob("*.py"))


def _functions():
  for path in SOURCES:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path.relative_to(REPO), node


def _parameters(node: ast.FunctionDef) -> list[ast.arg]:
  a = node.args
  named = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
  return named + [x for x in (a.vararg, a.kwarg) if x is not None]


def test_no_function_takes_more_than_eight_parameters():
  wide = [f"{p}:{n.lineno} {n.name} ({len(_parameters(n))})" for p, n in _functions()
          if len(_parameters(n)) > 8]
  assert wide == []


def test_every_signature_has_type_hints():
  missing = []
  for path, node in _functions():
    names = [x.arg for x in _parameters(node) if x.annotation is None]
    if node.returns is None and node.name != "__init__":
      names.append("return")
    if names:
      missing.append(f"{path}:{node.lineno} {node.name}: {names}")
  assert missing == []


def test_public_functions_with_more_than_four_parameters_have_an_args_block():
  bare = [f"{p}:{n.lineno} {n.name}" for p, n in _functions()
          if len(_parameters(n)) > 4 and not n.name.startswith("_")
          and "Args:" not in (ast.get_docstring(n) or "")]
  assert bare == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_defaults_live_in_configs_default_only(path):
  """`cfg.get("field", default)` restates a default; config_upgrade fills missing fields."""
  if path.name == "config_upgrade.py":
    return
  found = re.findall(r"\b(?:cfg|config)(?:\.\w+)*\.get\(\s*\"\w+\"\s*,", path.read_text())
  assert found == []
