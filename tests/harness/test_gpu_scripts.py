"""The GPU scripts' commands, checked on the CPU: every flag they pass is one the examples take."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks.convergence import load_example

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_quality.sh"


def _commands(*flags: str) -> list[list[str]]:
  out = subprocess.run(
    ["bash", str(SCRIPT), "--print", *flags], cwd=ROOT, check=True, capture_output=True, text=True
  ).stdout
  return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("flags", [(), ("--dry-run",)])
def test_every_command_parses_with_its_example(flags):
  commands = _commands(*flags)
  assert [c[2] for c in commands] == ["examples.classifier", "examples.char_lm"]
  for command in commands:
    assert command[1] == "-m"
    example = load_example(command[2].removeprefix("examples."))
    args = example.parse_args(command[3:])  # exits (and fails the test) on a bad flag
    assert [s.key for s in args.specs][:1] == ["sgd"]  # SGD first: it sets the target


def test_the_classifier_runs_the_papers_cifar_recipe():
  classifier = load_example("classifier")
  args = classifier.parse_args(_commands()[0][3:])
  assert (args.depth, args.width, args.batch_size, args.weight_decay) == (20, 16, 128, 5e-4)
  assert (args.epochs, args.warmup_epochs) == (20, 5)
  assert args.train_limit is None and args.test_limit is None
  assert {s.key for s in args.specs} == {"sgd", "adamw", "muon", "eva", "kfac", "shampoo"}
  assert args.lr_sgd == args.lr_eva == args.lr_kfac == 0.1  # the paper's one rate
  assert args.lr_adamw is None and args.lr is None  # the others at the example's defaults


def test_a_bad_flag_is_refused():
  run = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 2 and "usage" in run.stderr
