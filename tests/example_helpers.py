"""Shared by the tests of ``examples/``: import an example script, check its numbers.

The repository root is on the path through pytest (``pythonpath`` in ``pyproject.toml``),
so the examples and their harness are the package ``examples``.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType


def load_example(name: str) -> ModuleType:
  """``examples/<name>.py``, imported as the module ``examples.<name>``."""
  return importlib.import_module(f"examples.{name}")


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
