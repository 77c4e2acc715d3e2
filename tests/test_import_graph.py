"""The library's layers, read from its import statements: the optimizer rules
and their shared pieces never import a capture module or Flax, and the capture's
core imports no Flax either (the Linen and NNX front-ends do)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "eva_optax" / "_src"
CAPTURE = {"capture", "linen_capture", "nnx_capture"}
# Modules above the rules: the capture and what reads both trees.
ABOVE_RULES = CAPTURE | {"describe", "train_state"}


def _imports(module: str) -> set[str]:
  """Every module name imported by ``_src/<module>.py`` (absolute names)."""
  tree = ast.parse((SRC / f"{module}.py").read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      if node.module == "eva_optax._src":
        names.update(f"eva_optax._src.{alias.name}" for alias in node.names)
  return names


RULES = sorted(
  p.stem for p in SRC.glob("*.py") if p.stem != "__init__" and p.stem not in ABOVE_RULES
)


def test_every_module_is_classified():
  assert {"eva", "kfac", "shampoo", "statistics", "preconditioning"} <= set(RULES)


@pytest.mark.parametrize("module", RULES)
def test_rules_import_no_capture_and_no_flax(module):
  imported = _imports(module)
  assert not {f"eva_optax._src.{c}" for c in CAPTURE} & imported
  assert not [name for name in imported if name.split(".")[0] == "flax"]


def test_capture_core_imports_no_flax():
  imported = _imports("capture")
  assert not [name for name in imported if name.split(".")[0] == "flax"]
  assert not {"eva_optax._src.linen_capture", "eva_optax._src.nnx_capture"} & imported


def test_front_ends_do_not_borrow_each_others_names():
  assert "eva_optax._src.linen_capture" not in _imports("nnx_capture")
  assert "eva_optax._src.nnx_capture" not in _imports("linen_capture")
