"""benchmarks/knobs.py: the variants around the protocol's choice, and their runs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import pytest

from benchmarks import knobs
from examples.harness import protocol
from examples.harness.optimizers import SPEC_BY_KEY, Options
from tests.harness.test_harness_protocol import regression_task

pytestmark = pytest.mark.usefixtures("quick_compiles")


def test_the_variants_change_one_knob_each_around_the_chosen_point():
  task = dataclasses.replace(regression_task(0.0), output_layer="Dense_0")
  document = {
    "tuning": {
      "SGD": {"key": "sgd", "chosen": {"lr": 0.5}},
      "Eva": {"key": "eva", "chosen": {"lr": 0.2, "damping": 0.03, "kl_clip": 0.004}},
    }
  }
  sgd, eva = knobs.chosen_points(document, task)
  assert sgd == protocol.Point(0.5) and eva == protocol.Point(0.2, 0.03, 0.004)
  variants = knobs.variants(eva, task)
  assert variants[0] == ("chosen", "as chosen by the protocol", eva)
  by_knob = {}
  for knob, _, point in variants[1:]:
    by_knob.setdefault(knob, []).append(point)
  # KL normalisation: lr around sqrt(kl_clip) = 0.0632, the rest as chosen.
  lrs = [p.lr for p in by_knob["scaling"]]
  assert lrs == [0.02, 0.0632, 0.2]
  assert all(dict(p.extra) == {"scaling": "kl_normalise"} for p in by_knob["scaling"])
  assert [p.kl_clip for p in by_knob["kl_clip"]] == [0.0004, 0.04]
  assert [p.damping for p in by_knob["damping"]] == [3e-08, 3e-06, 0.003, 0.3]
  assert [dict(p.extra)["stat_decay"] for p in by_knob["stat_decay"]] == [0.0, 0.5, 0.95]
  # The correction at work: KL normalisation at sqrt(kl_clip)×√10, tiny dampings.
  assert [(p.lr, p.damping, dict(p.extra)["scaling"]) for p in by_knob["correction"]] == [
    (0.2, 3e-08, "kl_normalise"),
    (0.2, 3e-06, "kl_normalise"),
  ]
  assert "passthrough" not in by_knob  # a Dense layer alone: nothing is passed through
  with_norm = dataclasses.replace(
    task,
    init=lambda key: (
      {
        "Dense_0": {"kernel": np.ones((3, 1)), "bias": np.ones(1)},
        "LayerNorm_0": {"scale": np.ones(1), "bias": np.ones(1)},
      },
      {},
    ),
  )
  (passthrough,) = [p for k, _, p in knobs.variants(eva, with_norm) if k == "passthrough"]
  assert dict(passthrough.extra) == {"passthrough_scale": 33.3}  # 1 / damping 0.03
  assert (passthrough.lr, passthrough.damping, passthrough.kl_clip) == (0.2, 0.03, 0.004)
  (plain,) = by_knob["output layer"]
  assert dict(plain.extra) == {"plain_modules": ("Dense_0",)}
  # Every variant but the scaling ones keeps the chosen lr; each moves one knob only.
  for knob, points in by_knob.items():
    for p in points:
      moved = {f for f in ("lr", "damping", "kl_clip") if getattr(p, f) != getattr(eva, f)}
      assert moved <= {
        "scaling": {"lr"},
        "kl_clip": {"kl_clip"},
        "damping": {"damping"},
        "correction": {"lr", "damping"},
      }.get(knob, set()), knob
  assert "output layer" not in {k for k, _, _ in knobs.variants(eva, regression_task(0.0))}
  # Without a protocol: the task's rates and Eva's defaults.
  sgd, eva = knobs.chosen_points(None, task)
  assert sgd.lr == 0.05 and (eva.lr, eva.damping, eva.kl_clip) == (0.05, 0.03, 0.001)
  with pytest.raises(SystemExit, match="no SGD or no Eva"):
    knobs.chosen_points({"tuning": {"SGD": {"key": "sgd", "chosen": {"lr": 0.5}}}}, task)


def test_variant_rows_run_and_are_tabled():
  task = regression_task(0.0)  # one bare Dense: no output layer to leave out
  _, eva = knobs.chosen_points(None, task)
  variants = knobs.variants(eva, task)
  rows = [protocol.Row("SGD", SPEC_BY_KEY["sgd"], protocol.Point(0.05))] + [
    protocol.Row(f"Eva: {label}", SPEC_BY_KEY["eva"], p) for _, label, p in variants
  ]
  runs = protocol.final_runs(task, rows, (0,), 2, Options(), window=1)
  results = {r.name: r for r in runs[0]}
  assert len(results) == len(rows) and all(r.steps == 10 for r in results.values())
  final = {name: r.step_losses[-1] for name, r in results.items()}
  assert all(math.isfinite(v) for v in final.values())
  # The knobs act: stat_decay 0 and 0.95 end apart, as do the damping variants.
  assert final["Eva: stat_decay 0"] != final["Eva: stat_decay 0.95"]
  assert final["Eva: damping 0.003 (×0.1)"] != final["Eva: damping 0.3 (×10)"]
  summary = protocol.summarise(runs, task.target, 1)
  table = knobs.table(summary, variants, "train loss", summary["SGD"]["final"])
  lines = table.splitlines()
  assert lines[2].startswith("| reference | SGD | 0.05 |")
  assert any(
    line.startswith(
      "| scaling | Eva: KL normalisation, lr 0.01 = sqrt(kl_clip)/√10 | 0.01, 0.03, 0.001 |"
    )
    for line in lines
  )
  assert len(lines) == 2 + len(rows)
