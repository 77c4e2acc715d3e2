"""The examples run end to end on tiny data the test writes itself."""

from __future__ import annotations

import importlib.util
import json
import math
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


def _finite_numbers(node) -> bool:
  if isinstance(node, dict):
    return all(_finite_numbers(v) for v in node.values())
  if isinstance(node, list):
    return all(_finite_numbers(v) for v in node)
  if isinstance(node, float):
    return math.isfinite(node)
  if isinstance(node, str):
    return node.lower() not in ("nan", "inf", "-inf")
  return True


def test_autoencoder_demo_trains_all_seven_optimizers(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  _write_split(data, "train", 64, compress=True)
  _write_split(data, "test", 32, compress=False)
  out_dir = tmp_path / "out"
  demo = _load("autoencoder_demo")
  names = ["SGD", "AdamW", "Eva", "Eva-f", "Eva-s", "K-FAC", "Shampoo"]
  results = demo.main(
      ["--epochs", "1", "--batch-size", "32", "--data-dir", str(data), "--out", str(out_dir)]
  )
  out = capsys.readouterr().out
  assert [r.name for r in results] == names
  assert "nan" not in out.lower()

  table = (out_dir / "results.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  assert len(rows) == 1 + len(names)
  for name in names:
    assert f"| {name} |" in table
    assert f"| {name} |" in out  # the table is printed too
  assert "nan" not in table.lower()

  metrics = json.loads((out_dir / "metrics.json").read_text())
  assert list(metrics["optimizers"]) == names
  assert _finite_numbers(metrics)
  for name, m in metrics["optimizers"].items():
    assert m["state_bytes"] > 0, name
    assert len(m["train_losses"]) == len(m["test_losses"]) == 1
    assert len(m["step_losses"]) == 2  # 64 images, batch 32
  # SGD reaches its own final training loss by construction.
  assert metrics["optimizers"]["SGD"]["time_to_sgd_loss"] is not None

  for png in ("loss_vs_epoch.png", "loss_vs_time.png"):
    path = out_dir / png
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_autoencoder_demo_optimizer_subset_and_flags(tmp_path, capsys):
  demo = _load("autoencoder_demo")
  args = demo.parse_args(["--optimizers", "eva, kfac", "--lr-kfac", "0.01", "--out", "x"])
  assert args.optimizers == "eva,kfac"
  assert args.lr_kfac == 0.01 and args.lr_eva == 0.06 and args.lr_sgd == 0.6
  assert args.out == "x"
  assert demo.parse_args([]).out == "results/demo"
