"""`make bench`'s commands, checked without running them: every benchmark and every example
flag they pass parses (a typo would otherwise surface hours into the run)."""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.convergence import WORKLOADS, load_example

ROOT = Path(__file__).resolve().parents[2]


def _bench_commands() -> list[list[str]]:
  if shutil.which("make") is None:
    pytest.skip("make is not installed")
  env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
  out = subprocess.run(
    ["make", "-s", "-n", "bench"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
  ).stdout
  commands = [shlex.split(line) for line in out.splitlines() if " -m benchmarks." in line]
  return [c[c.index("-m") + 1 :] for c in commands]


COMMANDS = _bench_commands()


def test_bench_runs_every_protocol_then_the_headline_from_them():
  modules = [c[0] for c in COMMANDS]
  assert modules[:2] == ["benchmarks.step_time", "benchmarks.multi_device"]
  assert modules[-1] == "benchmarks.headline" and COMMANDS[-1][1:] == [
    "--readme",
    "docs/results.md",
  ]
  protocols = [c[c.index("--workload") + 1] for c in COMMANDS if c[0] == "benchmarks.protocol"]
  assert protocols == ["autoencoder", "char_lm", "classifier"]
  # the headline comes after every protocol it reads
  assert max(i for i, c in enumerate(COMMANDS) if c[0] == "benchmarks.protocol") < len(COMMANDS) - 1


@pytest.mark.parametrize(
  "command",
  [c for c in COMMANDS if c[0] in ("benchmarks.protocol", "benchmarks.knobs")],
  ids=lambda c: " ".join(c[:3]),
)
def test_every_protocol_and_knob_command_parses_with_its_example(command):
  module = importlib.import_module(command[0])
  args = module.parse_args(command[1:])  # exits (and fails the test) on a bad flag
  w = WORKLOADS[args.workload]
  flags = list(w.argv) + list(args.extra)
  optimizers = getattr(args, "optimizers", None)
  if optimizers:
    flags += ["--optimizers", optimizers]
  example_args = load_example(w.name).parse_args(flags)
  assert example_args.specs[0].key == "sgd"  # SGD first: it sets the target


def test_the_classifier_protocol_trains_on_every_image():
  command = next(
    c for c in COMMANDS if c[:3] == ["benchmarks.protocol", "--workload", "classifier"]
  )
  args = importlib.import_module("benchmarks.protocol").parse_args(command[1:])
  example_args = load_example("classifier").parse_args(
    list(WORKLOADS["classifier"].argv) + list(args.extra)
  )
  assert example_args.train_limit is None and example_args.test_limit is None
  assert (example_args.depth, example_args.width, example_args.epochs) == (8, 8, 6)
  assert example_args.eval_every > 0
