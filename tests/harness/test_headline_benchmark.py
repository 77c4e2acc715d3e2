"""benchmarks/headline.py: the ratios to SGD's and AdamW's final quality, by hand."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from benchmarks import headline
from examples.harness.records import jsonable
from examples.harness.training import Result


def _run(name, key, losses, seconds_per_step, seed):
  return Result(
    key,
    name,
    0.1,
    steps=len(losses),
    step_losses=list(losses),
    step_times=[seconds_per_step * (i + 1) for i in range(len(losses))],
    seed=seed,
    steps_per_epoch=len(losses),
    budget_steps=len(losses),
    curvature=CURVATURE[seed] if key == "eva" else {},
  )


# Eva's negligible fractions as the trainer records them: half its layers in seed 1 at the end.
CURVATURE = {
  seed: {
    "rules": ["eva"],
    "layers": 2,
    "parameters": 10,
    "steps": [1, 2, 4],
    "of_layers": [1.0, 1.0, last],
    "of_parameters": [1.0, 1.0, last],
    "largest_ratio": [1e-9, 1e-8, ratio],
  }
  for seed, last, ratio in ((0, 1.0, 1e-6), (1, 0.5, 0.5))
}


# Per seed, the final runs; the quality is the last step loss (reach_window 1).
SEED_RUNS = {
  # SGD ends at 0.5 (step 4, 4 s); AdamW at 0.2 (step 4, 4 s), passing 0.5 at step 2 (2 s);
  # Eva reaches 0.5 at step 2 (3 s) and never 0.2; K-FAC reaches 0.5 at step 3 (6 s).
  0: [
    ("SGD", "sgd", [1.0, 0.8, 0.6, 0.5], 1.0),
    ("AdamW", "adamw", [0.7, 0.4, 0.3, 0.2], 1.0),
    ("Eva", "eva", [0.9, 0.5, 0.4, 0.3], 1.5),
    ("K-FAC", "kfac", [0.8, 0.6, 0.5, 0.4], 2.0),
    ("K-FAC (authors')", "kfac-authors", [0.9, 0.7, 0.5, 0.45], 1.0),  # 0.5 at 3 s
    ("Eva (as published)", "eva", [0.9, 0.8, 0.7, 0.6], 1.5),
  ],
  # SGD ends at 0.4; Eva reaches it at step 1 (2 s) and AdamW's 0.1 at step 4 (8 s, AdamW 4 s).
  1: [
    ("SGD", "sgd", [1.0, 0.8, 0.6, 0.4], 1.0),
    ("AdamW", "adamw", [0.7, 0.4, 0.3, 0.1], 1.0),
    ("Eva", "eva", [0.4, 0.3, 0.2, 0.1], 2.0),
    ("K-FAC", "kfac", [0.8, 0.6, 0.5, 0.4], 2.0),
    ("K-FAC (authors')", "kfac-authors", [0.9, 0.7, 0.5, 0.45], 1.0),  # never 0.4
    ("Eva (as published)", "eva", [0.9, 0.8, 0.7, 0.6], 1.5),
  ],
}


@pytest.fixture
def results_dir(tmp_path):
  root = tmp_path / "protocol" / "autoencoder"
  for seed, runs in SEED_RUNS.items():
    (root / f"seed{seed}").mkdir(parents=True)
    optimizers = {name: asdict(_run(name, key, losses, dt, seed)) for name, key, losses, dt in runs}
    (root / f"seed{seed}" / "metrics.json").write_text(
      json.dumps(jsonable({"optimizers": optimizers}))
    )
  document = {
    "title": "tiny autoencoder",
    "protocol": {"seeds": [0, 1]},
    "settings": {"epochs": 1, "reach_window": 1, "command": "python -m benchmarks.protocol"},
    "machine": {"cpu": "cpu", "cpu_count": 2, "device": "cpu", "versions": {"jax": "x"}},
    "target": {"metric": "train_loss", "higher_is_better": False},
    "tuning": {
      "SGD": {"chosen": {"lr": 0.5}},
      "Eva": {"chosen": {"lr": 0.2, "damping": 0.03, "kl_clip": 0.003}},
    },
    "rows": [
      {"name": n, "key": k, "lr": 0.1, "damping": None, "kl_clip": None}
      for n, k, _, _ in SEED_RUNS[0]
    ],
    "budgets": {
      "Eva": {
        "budget": {"median": 0.5},
        "time_ratio": {"median": 0.6, "min": 0.6, "max": 0.6, "n": 1},
        "reached": 1,
        "seeds": 1,
      }
    },
  }
  (root / "protocol.json").write_text(json.dumps(document))
  return tmp_path


def test_ratios_against_sgd_and_adamw_by_hand(results_dir):
  p = headline.load(results_dir / "protocol" / "autoencoder")
  assert p.window == 1 and [len(r) for r in p.runs] == [6, 6]
  sgd = headline.against(p, "SGD")
  # Eva: seed 0 steps 2/4, time 3/4; seed 1 steps 1/4, time 2/4.
  assert sgd["Eva"]["steps_ratio"]["median"] == pytest.approx(0.375)
  assert sgd["Eva"]["time_ratio"]["median"] == pytest.approx(0.625)
  assert sgd["Eva"]["time_ratio"]["min"] == pytest.approx(0.5)
  assert sgd["SGD"]["steps_ratio"]["median"] == 1.0 and sgd["Eva"]["reached"] == 2
  # K-FAC reaches 0.5 at step 3 (6 s) in seed 0, 0.4 at its last step (8 s) in seed 1.
  assert sgd["K-FAC"]["reached"] == 2
  assert (
    sgd["Eva (as published)"]["reached"] == 0 and sgd["Eva (as published)"]["time_ratio"] is None
  )
  adamw = headline.against(p, "AdamW")
  # Eva never reaches 0.2 (seed 0); seed 1: 4 of 4 steps, 8 s of 4 s.
  assert adamw["Eva"]["reached"] == 1
  assert adamw["Eva"]["steps_ratio"]["median"] == pytest.approx(1.0)
  assert adamw["Eva"]["time_ratio"]["median"] == pytest.approx(2.0)
  # Eva over K-FAC, seconds to SGD's quality: 3/6 (seed 0), 2/8 (seed 1).
  over = headline.time_over(p, "Eva", "K-FAC")
  assert over["median"] == pytest.approx(0.375) and over["n"] == 2
  assert headline.time_over(p, "Eva", "Shampoo") is None


def test_the_tables_and_the_readme_block(results_dir, tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- headline:start -->\nold\n<!-- headline:end -->\nrest\n")
  headline.main(
    ["--results", str(results_dir / "protocol"), "--out", str(tmp_path), "--readme", str(readme)]
  )
  text = readme.read_text()
  assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
  lines = text.splitlines()
  # One table per workload: a column per Eva variant, a row per measure.
  assert "| | Eva tuned (0.2, 0.03, 0.003) | Eva as published (0.1, 0.03, 0.001) |" in lines

  def row(label):
    return next(line for line in lines if line.startswith(f"| {label} |"))

  assert row("steps to SGD's final, / SGD's") == (
    "| steps to SGD's final, / SGD's | 0.38 [0.25–0.50] | not reached (0 of 2) |"
  )
  assert row("time to SGD's final, / SGD's").startswith(
    "| time to SGD's final, / SGD's | 0.62 [0.50–0.75] |"
  )
  assert row("shortest whole schedule that gets there") == (
    "| shortest whole schedule that gets there | 50% (0.60× SGD's time) | – |"
  )
  assert (
    row("time to SGD's final, / K-FAC's")
    == "| time to SGD's final, / K-FAC's | 0.38 [0.25–0.50] | – |"
  )
  # Tuned Eva over the authors' K-FAC: 3 s / 3 s in seed 0; they never get there in seed 1.
  assert row("time to SGD's final, / the authors' K-FAC's") == (
    "| time to SGD's final, / the authors' K-FAC's | 1.00 (the authors' K-FAC reached it in 1 of 2) | – |"
  )
  assert row("steps to AdamW's final, / AdamW's") == (
    "| steps to AdamW's final, / AdamW's | 1.00 (1 of 2) | not reached (0 of 2) |"
  )
  assert row("time to AdamW's final, / AdamW's").startswith(
    "| time to AdamW's final, / AdamW's | 2.00 (1 of 2) |"
  )
  assert (
    "**Fashion-MNIST autoencoder** (1 epoch, 4 steps, 2 seeds); SGD's final quality, "
    "train loss (mean of the last 1 step losses): 0.45 [0.4–0.5]." in lines
  )
  # Below it, one row per tuned member: time to SGD's and AdamW's final, final quality.
  assert "| SGD | 1.00 | not reached (0 of 2) | 0.45 [0.4–0.5] |" in lines
  assert "| Eva | 0.62 [0.50–0.75] | 2.00 (1 of 2) | 0.2 [0.1–0.3] |" in lines
  assert not any(line.startswith("| Eva (as published) | 0.") for line in lines)
  md = (tmp_path / "headline.md").read_text()
  assert "| Eva | 0.2, 0.03, 0.003 | 0.2 [0.1–0.3] |" in md
  # Where Eva's correction is negligible, over both seeds (medians [min–max]).
  assert "| Eva | 0.1 | 2 (10) | 1 / 2 / 4 | 1.00 / 1.00 / 0.75 [0.50–1.00] |" in md
  assert "Not applicable (no rank-one correction): SGD, AdamW, K-FAC, K-FAC (authors')." in md
  summary = json.loads((tmp_path / "headline.json").read_text())
  assert summary["autoencoder"]["eva_over_kfac"]["median"] == pytest.approx(0.375)


def test_no_results_and_no_markers_are_clear_errors(results_dir, tmp_path):
  with pytest.raises(SystemExit, match="no protocol results"):
    headline.main(["--results", str(tmp_path), "--out", str(tmp_path)])
  plain = tmp_path / "plain.md"
  plain.write_text("no markers here")
  with pytest.raises(SystemExit, match="headline:start"):
    headline.main(
      ["--results", str(results_dir / "protocol"), "--out", str(tmp_path), "--readme", str(plain)]
    )
