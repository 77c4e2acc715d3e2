"""The examples run end to end on tiny data the test writes itself."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from test_datasets import _write_split

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_autoencoder_demo_trains_sgd_and_eva(tmp_path, capsys):
  _write_split(tmp_path, "train", 64, compress=True)
  _write_split(tmp_path, "test", 32, compress=False)
  demo = _load("autoencoder_demo")
  demo.main(["--epochs", "1", "--batch-size", "32", "--data-dir", str(tmp_path)])
  out = capsys.readouterr().out
  assert "SGD" in out and "Eva" in out
  assert "nan" not in out.lower()
