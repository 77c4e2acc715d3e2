"""The library's layers, read from its import statements: the optimizer rules
and their shared pieces never import a capture module or Flax, and the capture's
core imports no Flax either (the Linen and NNX front-ends do). Flax's naming
conventions live with the front-ends: no module below them names Flax's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "eva_optax" / "_src"
CAPTURE = {"capture", "linen_capture", "nnx_capture"}
# The Flax side: the front-ends and Flax's naming conventions for layouts.
FLAX_SIDE = {"linen_capture", "nnx_capture", "flax_layouts"}
# Modules above the rules: the capture, Flax's conventions and what reads both trees.
ABOVE_RULES = CAPTURE | FLAX_SIDE | {"describe", "train_state"}
# The names Flax gives the modules whose kernels' layouts their shapes leave open.
FLAX_MODULE_NAMES = {"query", "key", "value", "out", "einsum"}


def _sources(module: str) -> list[Path]:
  """The files of ``_src/<module>``: a module, or every module of a package."""
  package = SRC / module
  return sorted(package.glob("*.py")) if package.is_dir() else [SRC / f"{module}.py"]


def _imports(module: str) -> set[str]:
  """Every module name imported by ``_src/<module>`` (absolute names)."""
  names = set()
  for source in _sources(module):
    for node in ast.walk(ast.parse(source.read_text())):
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
  packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
  assert packages == {"capture"}  # the capture core, classified above the rules
  assert len(_sources("capture")) >= 5 and "flax" not in str(_imports("capture"))


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


def _string_constants(module: str) -> set[str]:
  return {
    node.value
    for source in _sources(module)
    for node in ast.walk(ast.parse(source.read_text()))
    if isinstance(node, ast.Constant) and isinstance(node.value, str)
  }


BELOW_FLAX_SIDE = sorted(
  p.stem for p in SRC.glob("*.py") if p.stem != "__init__" and p.stem not in FLAX_SIDE
) + ["capture"]


@pytest.mark.parametrize("module", BELOW_FLAX_SIDE)
def test_no_module_below_the_front_ends_names_flax_modules(module):
  found = {c for c in _string_constants(module) if c.lower() in FLAX_MODULE_NAMES}
  if module == "paths":  # JAX's key-path attributes (.key, NNX's .value), not module names
    found -= {"key", "value"}
  assert not found, f"{module}.py names Flax modules {found}: that belongs in flax_layouts.py"


def test_the_checker_sees_flax_names():
  assert {"query", "out", "einsum"} <= _string_constants("flax_layouts")
