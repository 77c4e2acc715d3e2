"""Shared by the tests of ``examples/``: import an example script, check its numbers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:  # the examples import their shared harness
  sys.path.insert(0, str(ROOT / "examples"))


def load_example(name: str) -> ModuleType:
  """``examples/<name>.py`` as the module ``name``."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def finite_numbers(node) -> bool:
  """Whether every number in a JSON-like tree is finite (NaN/inf strings included)."""
  if isinstance(node, dict):
    return all(finite_numbers(v) for v in node.values())
  if isinstance(node, list):
    return all(finite_numbers(v) for v in node)
  if isinstance(node, float):
    return math.isfinite(node)
  if isinstance(node, str):
    return node.lower() not in ("nan", "inf", "-inf")
  return True
