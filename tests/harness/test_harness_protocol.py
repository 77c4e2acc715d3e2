"""The tuning protocol: its grids, the stage-by-stage search, the validation split and a
whole run on a tiny regression task the test builds itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples.harness import (
  datasets,
  protocol,
  protocol_records,
  protocol_search,
  protocol_summary,
  protocol_tables,
  records,
  targets,
  training,
)
from examples.harness.optimizers import SPEC_BY_KEY, Options

pytestmark = pytest.mark.usefixtures("quick_compiles")
SQRT10 = 10**0.5


def test_learning_rates_are_log_spaced_around_the_centre():
  assert protocol_search.lr_grid(0.1) == [0.01, 0.0316, 0.1, 0.316, 1.0]
  assert protocol_search.lr_grid(0.06, points=6) == [0.006, 0.019, 0.06, 0.19, 0.6, 1.9]
  grid = protocol_search.lr_grid(0.003, points=7)
  assert len(grid) == 7 and grid[3] == 0.003
  assert all(b / a == pytest.approx(SQRT10, rel=2e-3) for a, b in zip(grid, grid[1:]))
  # Past an edge, the same grid continues (not the rounded edge times the step).
  assert protocol_search.lr_beyond(0.06, protocol_search.lr_grid(0.06), SQRT10, upwards=True) == 1.9
  assert protocol_search.lr_beyond(0.06, [1.9, 0.6], SQRT10, upwards=True) == 6.0
  assert protocol_search.lr_beyond(0.06, [0.006, 0.06], SQRT10, upwards=False) == 0.0019
  assert protocol_search.scaled(0.03, (1 / 3, 1, 3)) == [0.01, 0.03, 0.09]
  with pytest.raises(ValueError, match="at least 5"):
    protocol.Protocol(lr_points=4)
  with pytest.raises(ValueError, match="validation_fraction"):
    protocol.Protocol(validation_fraction=0.0)


def _drive(search, score, whole=None):
  """Run ``search`` to the end with ``score(point)`` (``whole(point)`` for a confirmation,
  5 and 20 steps); the stages of the points, in order ("<stage>+" for a confirmation)."""
  stages = []
  while points := search.pending():
    for p in points:
      confirming = search.confirming
      stages.append(search.stage + "+" * confirming)
      search.record(p, (whole if confirming else score)(p), 20 if confirming else 5)
  return stages


def test_eva_is_tuned_in_learning_rate_then_damping_then_kl_clip():
  p = protocol.Protocol(confirm_top=0)  # the search as before the confirmation stage
  search = protocol.Search(SPEC_BY_KEY["eva"], 0.06, p, higher_is_better=False)

  # Best learning rate 0.6 (inside the grid), damping 0.09, kl_clip 0.003.
  def score(point):
    s = abs(math.log(point.lr / 0.6))
    s += abs(math.log((point.damping or 0.03) / 0.09))
    return s + abs(math.log((point.kl_clip or 0.001) / 0.003))

  stages = _drive(search, score)
  # 0.6 is the top of the first grid: one point past it (1.9, worse), then stop.
  assert stages == ["lr"] * 6 + ["damping"] * 2 + ["kl_clip"] * 2
  assert search.grids == {
    "lr": [0.006, 0.019, 0.06, 0.19, 0.6, 1.9],
    "damping": [0.01, 0.03, 0.09],
    "kl_clip": [0.000333, 0.001, 0.003],
  }
  assert search.chosen() == {"lr": 0.6, "damping": 0.09, "kl_clip": 0.003}
  assert search.best.score == pytest.approx(0.0)
  # The damping points used the chosen learning rate, the KL-clip points both.
  damping = [t.point for t in search.trials if t.stage == "damping"]
  assert damping == [protocol.Point(0.6, 0.01), protocol.Point(0.6, 0.09)]
  kl = [t.point for t in search.trials if t.stage == "kl_clip"]
  assert kl == [protocol.Point(0.6, 0.09, 0.000333), protocol.Point(0.6, 0.09, 0.003)]


def test_damping_only_for_second_order_and_kl_clip_only_for_eva():
  p = protocol.Protocol(confirm_top=0)
  flat = lambda point: 1.0 + (point.lr != 0.1)  # 0.1 wins, in the middle of the grid
  for key, stages in [
    ("sgd", ["lr"] * 5),
    ("adamw", ["lr"] * 5),
    ("kfac", ["lr"] * 5 + ["damping"] * 2),
    ("shampoo", ["lr"] * 5 + ["damping"] * 2),
  ]:
    search = protocol.Search(SPEC_BY_KEY[key], 0.1, p, higher_is_better=False)
    assert _drive(search, flat) == stages, key
    assert search.best.point.lr == 0.1, key
  shampoo = protocol.Search(SPEC_BY_KEY["shampoo"], 0.1, p, higher_is_better=False)
  _drive(shampoo, flat)
  assert shampoo.grids["damping"] == [3.33e-07, 1e-06, 3e-06]  # around its own default
  # With the confirmation, the two best of each grid rerun over the whole budget; Eva in
  # front of AdamW: lr and damping (around Eva's 0.03), its grid centred on AdamW's rate.
  stages = ["lr"] * 5 + ["lr+"] * 2 + ["damping"] * 2 + ["damping+"]
  for key in ("kfac", "eva-f+adamw", "eva+adamw"):
    confirmed = protocol.Search(SPEC_BY_KEY[key], 0.1, protocol.Protocol(), False)
    assert _drive(confirmed, flat, flat) == stages, key
  assert confirmed.grids["damping"] == [0.01, 0.03, 0.09]
  centre = protocol_search.centre_key
  assert centre(SPEC_BY_KEY["eva-f+adamw"], {"adamw": 1e-3, "eva-f": 0.1}) == "adamw"
  assert centre(SPEC_BY_KEY["eva+adamw"], {"eva+adamw": 3e-3, "adamw": 1e-3}) == "eva+adamw"
  assert centre(SPEC_BY_KEY["eva"], {}) == "eva"


def test_the_confirmation_reruns_the_two_best_of_each_grid_over_the_whole_budget():
  search = protocol.Search(SPEC_BY_KEY["eva"], 0.06, protocol.Protocol(), higher_is_better=False)
  # Short runs prefer lr 0.6, damping 0.09, kl_clip 0.003; whole runs lr 0.19, damping
  # 0.03 (the default), kl_clip 0.003.
  log = lambda v, best: abs(math.log(v / best))
  short = lambda p: log(p.lr, 0.6) + log(p.damping or 0.03, 0.09) + log(p.kl_clip or 1e-3, 3e-3)
  whole = lambda p: log(p.lr, 0.19) + log(p.damping or 0.03, 0.03) + log(p.kl_clip or 1e-3, 3e-3)
  stages = _drive(search, short, whole)
  # lr: 0.6 then 0.19 (1.9 is a hair farther) confirmed; damping: 0.09 and the choice so
  # far (lr 0.19, already run over the whole budget, not again); kl_clip: 0.003 likewise.
  assert stages == ["lr"] * 6 + ["lr+"] * 2 + ["damping"] * 2 + ["damping+"] + ["kl_clip"] * 2 + [
    "kl_clip+"
  ]
  confirmed = [t.point for t in search.trials if t.confirmation]
  assert confirmed == [
    protocol.Point(0.6),
    protocol.Point(0.19),
    protocol.Point(0.19, 0.09),
    protocol.Point(0.19, None, 0.003),
  ]
  assert search.chosen() == {"lr": 0.19, "damping": 0.03, "kl_clip": 0.003}
  assert search.best.confirmation and search.best.score == pytest.approx(0.0)
  # The damping and KL clip grids centre on the confirmed rate, not the short-budget one.
  assert {t.point.lr for t in search.trials if t.stage != "lr"} == {0.19}
  c = search.confirmations()
  assert c["lr"]["short_choice"]["lr"] == 0.6 and c["lr"]["chosen"]["lr"] == 0.19
  assert c["lr"]["changed"] and c["damping"]["changed"] and not c["kl_clip"]["changed"]
  assert (
    c["damping"]["short_choice"]["damping"] == 0.09 and c["damping"]["chosen"]["damping"] is None
  )
  assert [q["run_in"] for q in c["damping"]["points"]] == ["damping", "lr"]
  assert [q["steps"] for q in c["lr"]["points"]] == [20, 20]
  assert search.runs() == {
    "count": 14,
    "steps": 10 * 5 + 4 * 20,
    "confirmation_count": 4,
    "confirmation_steps": 80,
  }
  assert protocol_tables._confirmation_cell(search) == (
    "lr 0.6 → 0.19; damping 0.09 → 0.03; kl_clip 0.003 kept"
  )
  # A diverged point is never confirmed; with confirm_top 0 the short-budget best stands.
  sgd = protocol.Search(SPEC_BY_KEY["sgd"], 0.1, protocol.Protocol(), False)
  scores = {0.01: 0.5, 0.0316: float("nan"), 0.1: 0.4, 0.316: 0.3, 1.0: float("nan")}
  assert _drive(sgd, lambda p: scores[p.lr], lambda p: -p.lr) == ["lr"] * 5 + ["lr+"] * 2
  assert [t.point.lr for t in sgd.trials if t.confirmation] == [0.316, 0.1]
  assert sgd.best.point.lr == 0.316
  off = protocol.Search(SPEC_BY_KEY["eva"], 0.06, protocol.Protocol(confirm_top=0), False)
  assert len(_drive(off, short, whole)) == 10 and off.chosen()["lr"] == 0.6
  with pytest.raises(ValueError, match="confirm_top"):
    protocol.Protocol(confirm_top=-1)


def test_an_edge_grows_at_most_max_extensions_times_and_divergence_scores_worst():
  p = protocol.Protocol(max_extensions=2, confirm_top=0)
  # Higher is better and grows with the rate: the top edge wins every time.
  search = protocol.Search(SPEC_BY_KEY["sgd"], 0.1, p, higher_is_better=True)
  assert _drive(search, lambda point: point.lr) == ["lr"] * 7
  assert search.grids["lr"][-2:] == [3.16, 10.0] and search.best.point.lr == 10.0
  # A diverged run (NaN) is the worst; of equal scores the first tried wins.
  search = protocol.Search(SPEC_BY_KEY["sgd"], 0.1, p, higher_is_better=True)
  scores = {0.01: 0.5, 0.0316: 0.7, 0.1: 0.7, 0.316: float("nan"), 1.0: float("nan")}
  assert _drive(search, lambda point: scores[point.lr]) == ["lr"] * 5
  assert search.best.point.lr == 0.0316
  with pytest.raises(ValueError):
    search.record(protocol.Point(0.5), 1.0)  # not a pending point


def test_the_validation_split_is_fixed_disjoint_and_keeps_order():
  x = np.arange(40)
  (train,), (validation,) = datasets.holdout((x,), 0.25)
  assert len(train) == 30 and len(validation) == 10
  assert sorted(np.concatenate([train, validation]).tolist()) == list(range(40))
  assert np.all(np.diff(train) > 0) and np.all(np.diff(validation) > 0)
  (again,), _ = datasets.holdout((x,), 0.25)
  np.testing.assert_array_equal(train, again)
  (a, b), (va, vb) = datasets.holdout((x, 2 * x), 0.25)  # aligned arrays stay aligned
  np.testing.assert_array_equal(b, 2 * a)
  np.testing.assert_array_equal(vb, 2 * va)
  with pytest.raises(ValueError, match="empty"):
    datasets.holdout((x,), 0.001)


def regression_task(validation_fraction: float) -> training.Task:
  """Linear regression, 40 samples (batch 8) with a held-out part when asked."""
  rng = np.random.default_rng(0)
  w = np.array([[1.0], [-2.0], [0.5]], np.float32)
  x = rng.standard_normal((40, 3)).astype(np.float32)
  test_x = rng.standard_normal((16, 3)).astype(np.float32)
  arrays = (x, x @ w)
  if validation_fraction:
    arrays, evaluation = datasets.holdout(arrays, validation_fraction)
  else:
    evaluation = (test_x, test_x @ w)
  model = nn.Dense(1)

  def loss_fn(params, model_state, batch):
    inputs, targets = batch
    loss = jnp.mean(jnp.square(model.apply({"params": params}, inputs) - targets))
    return loss, (model_state, {})

  return training.Task(
    name="tiny regression",
    init=lambda key: (model.init(key, jnp.zeros((1, 3)))["params"], {}),
    loss_fn=loss_fn,
    eval_fn=lambda params, state, batch: {"loss": loss_fn(params, state, batch)[0]},
    train_epoch=lambda r: datasets.batches(arrays, 8, rng=r),
    test_batches=lambda: iter([evaluation]),
    steps_per_epoch=len(arrays[0]) // 8,
    example_batch=(arrays[0][:8], arrays[1][:8]),
    schedule=lambda lr, total: optax.linear_schedule(lr, 0.0, transition_steps=total),
    default_lrs={"sgd": 0.05, "eva": 0.05},
    eval_split="validation" if validation_fraction else "test",
  )


@pytest.fixture(scope="module")
def tiny_protocol(quick_compiles, tmp_path_factory):
  """The whole protocol on the tiny task, SGD and Eva, run once for the tests below: its
  outcome, its folder and the validation fractions it asked the task for."""
  asked = []

  def make_task(fraction):
    asked.append(fraction)
    return regression_task(fraction)

  p = protocol.Protocol(
    seeds=(0, 1), validation_fraction=0.2, tune_fraction=0.5, budgets=(0.5, 1.0), budget_seeds=(1,)
  )
  out = tmp_path_factory.mktemp("tiny")
  specs = [SPEC_BY_KEY["sgd"], SPEC_BY_KEY["eva"]]
  outcome = protocol.run_protocol(make_task, specs, p, Options(), epochs=2, out=out, title="tiny")
  return outcome, out, asked


def test_the_whole_protocol_on_a_tiny_task(tiny_protocol):
  outcome, tmp_path, asked = tiny_protocol
  doc = json.loads((tmp_path / "protocol.json").read_text())
  assert doc["protocol"]["validation_fraction"] == 0.2

  for name, key in (("SGD", "sgd"), ("Eva", "eva")):
    tuning = doc["tuning"][name]
    assert tuning["steps"] == 5  # half of 2 epochs of 5 steps
    assert len(tuning["grids"]["lr"]) >= 5
    short = [t for t in tuning["trials"] if not t["confirmation"]]
    whole = [t for t in tuning["trials"] if t["confirmation"]]
    assert {t["steps"] for t in short} == {5} and {t["steps"] for t in whole} == {10}
    lr_trials = [t for t in short if t["stage"] == "lr"]
    assert sorted(t["lr"] for t in lr_trials) == tuning["grids"]["lr"]
    # The lr confirmation: the two best short lr trials, rerun over the whole budget.
    two = sorted(lr_trials, key=lambda t: t["score"])[:2]  # lower loss is better
    assert [t["lr"] for t in whole if t["stage"] == "lr"] == [t["lr"] for t in two]
    lr_whole = min((t for t in whole if t["stage"] == "lr"), key=lambda t: t["score"])
    confirmation = tuning["confirmation"]["lr"]
    assert confirmation["chosen"]["lr"] == lr_whole["lr"]
    assert confirmation["changed"] == (lr_whole["lr"] != two[0]["lr"])
    assert [q["short_score"] for q in confirmation["points"]] == [t["score"] for t in two]
    # The chosen trial is a whole-budget one, and its score is the recorded one.
    best = outcome.searches[key].best
    assert best.confirmation and tuning["score"] == best.score and tuning["score_steps"] == 10
    assert tuning["chosen"]["lr"] == best.point.lr and tuning["confirm_top"] == 2
    assert tuning["runs"] == {
      "count": len(tuning["trials"]),
      "steps": 5 * len(short) + 10 * len(whole),
      "confirmation_count": len(whole),
      "confirmation_steps": 10 * len(whole),
    }
  assert set(doc["tuning"]["Eva"]["grids"]) == {"lr", "damping", "kl_clip"}
  assert set(doc["tuning"]["SGD"]["grids"]) == {"lr"}

  # The final rows: the tuned ones (SGD first), then the paper's recipe, one rate of 0.1.
  names = [r["name"] for r in doc["rows"]]
  assert names == ["SGD", "Eva", "SGD (as published)", "K-FAC (as published)", "Eva (as published)"]
  assert [r["lr"] for r in doc["rows"][2:]] == [0.1, 0.1, 0.1]
  assert doc["rows"][1]["lr"] == doc["tuning"]["Eva"]["chosen"]["lr"]
  assert len(outcome.runs) == 2 and all(len(results) == 5 for results in outcome.runs)
  for seed, results in zip((0, 1), outcome.runs):
    assert all(r.seed == seed and r.steps == 10 for r in results)

  sgd_final_seed1 = targets.final_quality(outcome.runs[1][0], training.Target(), 10)
  sgd = doc["summary"]["SGD"]
  assert sgd["steps_ratio"]["median"] == 1.0 and sgd["seeds"] == 2
  if doc["rows"][0]["lr"] != 0.1:  # tuned SGD and SGD as published are separate runs
    assert outcome.runs[0][0].step_losses != outcome.runs[0][2].step_losses

  # Budget to quality: the tuned rows, seed 1, half and whole budgets (5 and 10 steps).
  budgets = doc["budgets"]
  assert list(budgets) == ["SGD", "Eva"]
  for i, (name, row) in enumerate(budgets.items()):
    (seed,) = row["per_seed"]
    quality = {float(b): q for b, q in seed["quality"].items()}
    assert seed["budget"] == protocol_summary.shortest_budget(quality, seed["reference"], False), (
      name
    )
    assert seed["reference"] == pytest.approx(sgd_final_seed1)
    # The whole budget is the final run of seed 1, not a new one.
    whole = targets.final_quality(outcome.runs[1][i], training.Target(), 10)
    assert quality[1.0] == pytest.approx(whole), name
    if seed["budget"] is not None:
      assert seed["steps"] == round(seed["budget"] * 10), name
  assert budgets["SGD"]["per_seed"][0]["budget"] == 1.0 or (
    budgets["SGD"]["per_seed"][0]["quality"]["0.5"] <= sgd_final_seed1
  )
  md = (tmp_path / "protocol.md").read_text()
  assert "## Budget to quality" in md
  assert "| train loss (mean of the last 10 step losses) at 50% of the budget | at 100% |" in md
  assert "| SGD | 0.005, 0.0158, 0.05, 0.158, 0.5" in md
  assert "(chosen)" in md and "| Eva (as published) | 0.1 | 0.03 | 0.001 |" in md
  assert "ran again over the whole budget on the validation split" in md
  assert "| SGD | lr, confirmation | lr " in md and "the confirmation's of 10 steps" in md
  assert "final train loss (mean of the last 10 step losses)" in md
  # The curvature over the final runs: Eva's rows (both seeds), the others not applicable.
  curvature = md.split("## Does the curvature act?")[1]
  eva_lr = doc["tuning"]["Eva"]["chosen"]["lr"]
  assert f"| Eva | {eva_lr:g} | 1 (4) | 1 / 3 / 5 / 10 |" in curvature
  assert "| Eva (as published) | 0.1 | 1 (4) | 1 / 3 / 5 / 10 |" in curvature
  assert "Not applicable (no rank-one correction): SGD, SGD (as published), K-FAC" in curvature
  for seed in (0, 1):
    assert (tmp_path / f"seed{seed}" / "results.md").is_file()


def test_a_recorded_tuning_gives_the_final_runs_more_seeds_without_tuning_again(
  tiny_protocol, tmp_path
):
  specs = [SPEC_BY_KEY["sgd"], SPEC_BY_KEY["eva"]]
  settings = dict(validation_fraction=0.2, tune_fraction=0.5, budgets=(1.0,))
  first, first_out, _ = tiny_protocol
  recorded = json.loads((first_out / "protocol.json").read_text())
  asked = []

  def make_task(fraction):
    asked.append(fraction)
    return regression_task(fraction)

  again = protocol.run_protocol(
    make_task,
    specs,
    protocol.Protocol(seeds=(0, 2), **settings),
    Options(),
    epochs=2,
    out=tmp_path / "b",
    title="tiny",
    recorded=recorded,
  )
  assert asked == [0.0]  # the validation split is never built: nothing is tuned
  for key, search in first.searches.items():
    read = again.searches[key]
    assert read.grids == search.grids and read.stage == "done" and not read.pending()
    assert [(t.stage, t.point, t.score) for t in read.trials] == [
      (t.stage, t.point, t.score) for t in search.trials
    ]
    assert read.chosen() == search.chosen()
  assert [r.point for r in again.rows] == [r.point for r in first.rows]
  # Seed 0's final runs are the first protocol's, step for step; seed 2 is new.
  for a, b in zip(first.runs[0], again.runs[0]):
    np.testing.assert_allclose(b.step_losses, a.step_losses, rtol=1e-6)
  assert len(again.runs) == 2 and all(r.seed == 2 for r in again.runs[1])
  md = (tmp_path / "b" / "protocol.md").read_text()
  assert "(the confirmation, as recorded, not run again)" in md
  written = json.loads((tmp_path / "b" / "protocol.json").read_text())
  assert written["tuning"] == recorded["tuning"]

  # A record tuned otherwise, one without an optimizer, or one whose choice is not its
  # best trial, is refused, naming what differs.
  with pytest.raises(ValueError, match="tune_fraction 0.5, this protocol 0.25"):
    protocol.run_protocol(
      regression_task,
      specs,
      protocol.Protocol(validation_fraction=0.2, budgets=(1.0,)),
      Options(),
      epochs=2,
      out=tmp_path / "c",
      title="tiny",
      recorded=recorded,
    )
  with pytest.raises(ValueError, match="no K-FAC"):
    protocol.recorded_tuning(
      recorded, [SPEC_BY_KEY["kfac"]], protocol.Protocol(**settings), False, 5
    )
  with pytest.raises(ValueError, match="ran 5 steps per point, this budget's 10"):
    protocol.recorded_tuning(recorded, specs, protocol.Protocol(**settings), False, 10)
  with pytest.raises(ValueError, match=r"confirmation of SGD ran \[10\] steps, this budget's 20"):
    protocol.recorded_tuning(recorded, specs, protocol.Protocol(**settings), False, 5, 20)
  # A record from before the confirmation stage (no confirmation trials, no confirm_top nor
  # steps per trial) still reads, as its short-budget choice, and says it had none.
  old = json.loads(json.dumps(recorded))
  for tuning in old["tuning"].values():
    for k in ("confirm_top", "confirmation", "runs", "score_steps"):
      del tuning[k]
    tuning["trials"] = [
      {k: v for k, v in t.items() if k not in ("steps", "confirmation")}
      for t in tuning["trials"]
      if not t["confirmation"]
    ]
    tuning["chosen"]["lr"] = min(tuning["trials"], key=lambda t: t["score"])["lr"]
  del old["protocol"]["confirm_top"]
  read = protocol.recorded_tuning(old, specs, protocol.Protocol(**settings), False, 5, 10)
  for search in read.values():
    assert search.confirm_top == 0 and not search.confirmations()
    assert not search.best.confirmation and search.runs()["confirmation_count"] == 0
    assert search.runs()["steps"] == 5 * len(search.trials)
  note = protocol_records.confirmation_note(read, recorded=True)
  assert note.startswith("The recorded tuning had no confirmation stage")
  recorded["tuning"]["Eva"]["chosen"]["lr"] *= 3
  with pytest.raises(ValueError, match="Eva: the recorded choice"):
    protocol.recorded_tuning(recorded, specs, protocol.Protocol(**settings), False, 5)


def run_recorded(recorded, p, out, resume, settings=None):
  """SGD and Eva on the tiny task, their tuning read from ``recorded``: the final runs."""
  return protocol.run_protocol(
    regression_task,
    [SPEC_BY_KEY["sgd"], SPEC_BY_KEY["eva"]],
    p,
    Options(),
    epochs=2,
    out=out,
    title="tiny",
    recorded=recorded,
    settings=settings or {"command": "first"},
    resume=resume,
  )


def test_a_stopped_protocol_resumes_with_the_final_runs_it_finished(
  tiny_protocol, tmp_path, monkeypatch
):
  p = protocol.Protocol(
    seeds=(0, 2), validation_fraction=0.2, tune_fraction=0.5, budgets=(0.5, 1.0), budget_seeds=(2,)
  )
  _, first_out, _ = tiny_protocol
  recorded = json.loads((first_out / "protocol.json").read_text())
  ran = []
  real = protocol.interleave

  def interleave(trainers, chunk):
    ran.append((trainers[0].config.seed, trainers[0].config.steps))
    return real(trainers, chunk)

  monkeypatch.setattr(protocol, "interleave", interleave)
  out = tmp_path / "r"

  def run(resume, settings=None):
    return run_recorded(recorded, p, out, resume, settings)

  whole = run(resume=False)
  assert ran == [(0, 10), (2, 10), (2, 5)]
  kept = sorted(f.name for f in (out / "runs").iterdir())
  assert kept == ["seed0-steps10.json", "seed2-steps10.json", "seed2-steps5.json"]
  (out / "runs" / "seed2-steps10.json").unlink()  # stopped during seed 2
  ran.clear()
  resumed = run(resume=True, settings={"command": "first --resume"})  # the command may differ
  assert ran == [(2, 10)]  # only what was not finished
  for a, b in zip(whole.runs[0], resumed.runs[0]):
    assert b.name == a.name and b.step_losses == a.step_losses and b.curvature == a.curvature
    assert b.step_times == a.step_times and b.time_to_target == a.time_to_target
  assert resumed.budgets["Eva"]["per_seed"][0]["quality"] == pytest.approx(
    whole.budgets["Eva"]["per_seed"][0]["quality"]
  )
  # Other workload settings, other rows, or no resume: nothing is read back.
  rows = resumed.rows
  for store, rows_asked in (
    (protocol.RunStore(out / "runs", {"epochs": 3}, resume=True), rows),
    (protocol.RunStore(out / "runs", {}, resume=True), rows[:1]),
    (protocol.RunStore(out / "runs", {}, resume=False), rows),
  ):
    assert store.load(rows_asked, 0, 10) is None
  assert protocol.RunStore(out / "runs", {}, resume=True).load(rows, 0, 10) is not None


def test_the_tuning_alone_is_a_record_the_final_runs_take_later(tiny_protocol, tmp_path):
  """tune_only (benchmarks.protocol --tune-only) writes part 1 only: a protocol.json
  whose tuning a later run reads as its own, and no final runs."""
  specs = [SPEC_BY_KEY["sgd"], SPEC_BY_KEY["eva"]]
  settings = dict(validation_fraction=0.2, tune_fraction=0.5, budgets=(1.0,))
  first, first_out, _ = tiny_protocol
  recorded = json.loads((first_out / "protocol.json").read_text())
  alone = protocol.run_protocol(
    regression_task,
    specs,
    protocol.Protocol(seeds=(0,), **settings),
    Options(),
    epochs=2,
    out=tmp_path / "tuning",
    title="tiny",
    recorded=recorded,
    tune_only=True,
  )
  assert alone.rows == [] and alone.runs == [] and alone.summary == {}
  written = json.loads((tmp_path / "tuning" / "protocol.json").read_text())
  assert written["tuning"] == recorded["tuning"] and written["rows"] == []
  assert not list((tmp_path / "tuning").glob("seed*"))
  md = (tmp_path / "tuning" / "protocol.md").read_text()
  assert "The tuning alone (`--tune-only`)" in md and "## Full budget" not in md
  read = protocol.recorded_tuning(written, specs, protocol.Protocol(**settings), False, 5, 10)
  assert {k: s.chosen() for k, s in read.items()} == {
    k: s.chosen() for k, s in first.searches.items()
  }


def test_a_recorded_diverged_trial_reads_back_as_scoring_worst():
  # protocol.json stores a diverged trial's score as the string "nan" (training.jsonable).
  trial = lambda lr, score: {
    "stage": "lr",
    "lr": lr,
    "damping": None,
    "kl_clip": None,
    "extra": [],
    "score": score,
  }
  record = {
    "grids": {"lr": [0.1, 0.316, 1.0]},
    "chosen": {"lr": 0.316, "damping": None, "kl_clip": None},
    "trials": [trial(0.1, 0.5), trial(0.316, 0.4), trial(1.0, "nan")],
  }
  search = protocol.Search.recorded(SPEC_BY_KEY["sgd"], record, protocol.Protocol(), False)
  assert math.isnan(search.trials[2].score) and search.best.point.lr == 0.316


def test_the_shortest_budget_is_the_first_to_reach_the_reference():
  quality = {0.25: 0.5, 0.5: 0.3, 0.75: 0.2, 1.0: 0.1}
  assert protocol_summary.shortest_budget(quality, 0.3, higher_is_better=False) == 0.5
  assert protocol_summary.shortest_budget(quality, 0.05, higher_is_better=False) is None
  assert protocol_summary.shortest_budget(quality, 0.3, higher_is_better=True) == 0.25
  assert protocol_summary.shortest_budget({0.5: float("nan"), 1.0: 0.8}, 0.8, True) == 1.0
  assert protocol_summary.shortest_budget(quality, float("nan"), False) is None
  with pytest.raises(ValueError, match="budgets"):
    protocol.Protocol(budgets=(0.5, 0.25, 1.0))
  # Shorter budgets without the whole one would run and then have nothing to compare with.
  with pytest.raises(ValueError, match="end with the whole budget 1"):
    protocol.Protocol(budgets=(0.25, 0.5))
  with pytest.raises(ValueError, match="budget_seeds"):
    protocol.Protocol(seeds=(0, 1), budget_seeds=(2,))


def _run(key, final_loss, steps, seconds_per_step):
  """A finished run whose last step loss is ``final_loss`` (the quality for a window of 1)."""
  return training.Result(
    key,
    key.upper(),
    0.1,
    steps=steps,
    step_losses=[1.0] * (steps - 1) + [final_loss],
    step_times=[seconds_per_step * (i + 1) for i in range(steps)],
  )


def test_budget_to_quality_by_hand():
  loss = training.Target("train_loss")
  # by_budget[fraction][seed] = [SGD, Eva]; SGD's whole budget: 8 steps of 1 s (seed 0),
  # of 1.25 s (seed 1).
  by_budget = {
    0.25: [
      [_run("sgd", 0.6, 2, 1.0), _run("eva", 0.40, 2, 1.25)],
      [_run("sgd", 0.5, 2, 1.25), _run("eva", 0.24, 2, 1.5)],
    ],
    0.5: [
      [_run("sgd", 0.45, 4, 1.0), _run("eva", 0.29, 4, 1.25)],
      [_run("sgd", 0.4, 4, 1.25), _run("eva", 0.20, 4, 1.5)],
    ],
    1.0: [
      [_run("sgd", 0.30, 8, 1.0), _run("eva", 0.20, 8, 1.25)],
      [_run("sgd", 0.25, 8, 1.25), _run("eva", 0.15, 8, 1.5)],
    ],
  }
  crossing = {
    "steps_ratio": {"median": 0.9, "min": 0.9, "max": 0.9, "n": 1},
    "time_ratio": {"median": 0.95, "min": 0.95, "max": 0.95, "n": 1},
  }
  s = protocol.budget_summary(by_budget, loss, window=1, summary={"EVA": crossing})
  eva, sgd = s["EVA"], s["SGD"]
  # Seed 0: 50% (0.29 <= 0.30), 4 of 8 steps, 5 s of 8 s; seed 1: 25% (0.24 <= 0.25),
  # 2 of 8 steps, 3 s of 10 s.
  assert [p["budget"] for p in eva["per_seed"]] == [0.5, 0.25]
  assert eva["budget"]["median"] == pytest.approx(0.375)
  assert eva["steps_ratio"]["median"] == pytest.approx((0.5 + 0.25) / 2)
  assert eva["time_ratio"]["median"] == pytest.approx((5 / 8 + 3 / 10) / 2)
  assert eva["time_ratio"]["min"] == pytest.approx(0.3)
  assert eva["quality"]["0.25"]["median"] == pytest.approx(0.32)
  assert eva["reached"] == 2 and eva["crossing_time_ratio"]["median"] == 0.95
  # SGD reaches its own whole-budget quality only with the whole budget.
  assert sgd["budget"]["median"] == 1.0 and sgd["steps_ratio"]["median"] == 1.0
  assert "crossing_steps_ratio" not in sgd
  table = protocol_tables.budget_table(s, loss, window=1)
  assert "| EVA | 0.32 [0.24–0.4] | 0.245 [0.2–0.29] | 0.175 [0.15–0.2] | 38% [25%–50%] " in table
  assert "| 0.38 [0.25–0.50] | 0.46 [0.30–0.62] | 2/2 | 0.90 | 0.95 |" in table
  # A seed where a budget never reaches SGD's quality counts as not reached.
  by_budget[1.0][1][1] = _run("eva", 0.26, 8, 1.5)
  by_budget[0.25][1][1] = _run("eva", 0.27, 2, 1.5)
  by_budget[0.5][1][1] = _run("eva", 0.27, 4, 1.5)
  s = protocol.budget_summary(by_budget, loss, window=1)
  assert s["EVA"]["reached"] == 1 and s["EVA"]["budget"]["median"] == 0.5


def test_records_keep_lists_of_numbers_on_one_line_and_read_back_equal():
  document = {
    "name": "SGD",
    "step_losses": [5.25, 4.5, float("nan")],
    "point": (0.1, None),
    "trials": [{"lr": 0.1, "score": 0.5}, {"lr": 1.0, "score": float("inf")}],
    "grids": {"lr": [0.1, 0.316]},
    "empty": {},
    "none": [],
  }
  text = records.dumps(document)
  lines = text.splitlines()
  assert ' "step_losses": [5.25, 4.5, "nan"],' in lines
  assert ' "point": [0.1, null],' in lines
  assert '  "lr": [0.1, 0.316]' in lines
  assert '   "score": "inf"' in lines  # a dict inside a list: one key per line
  assert ' "empty": {},' in lines and ' "none": []' in lines
  assert text.endswith("}\n") and len(lines) == 20
  read = records.from_json(json.loads(text))
  assert read["step_losses"][:2] == [5.25, 4.5] and math.isnan(read["step_losses"][2])
  assert read["trials"] == [{"lr": 0.1, "score": 0.5}, {"lr": 1.0, "score": float("inf")}]
  assert read["point"] == [0.1, None] and read["grids"] == {"lr": [0.1, 0.316]}
  assert read["empty"] == {} and read["none"] == [] and read["name"] == "SGD"


def test_a_final_run_stopped_midway_resumes_from_its_last_epochs(
  tiny_protocol, tmp_path, monkeypatch
):
  """A seed's group stopped between epochs resumes each trainer from its own last epoch
  checkpoint and ends as the uninterrupted group did; the checkpoints go once it is kept."""
  p = protocol.Protocol(seeds=(0,), validation_fraction=0.2, tune_fraction=0.5, budgets=(1.0,))
  _, first_out, _ = tiny_protocol
  recorded = json.loads((first_out / "protocol.json").read_text())

  def run(out, resume):
    return run_recorded(recorded, p, out, resume)

  whole = run(tmp_path / "whole", resume=False)
  save = training.save_checkpoint  # as the Trainer imports it
  saved, stop_after = [], [3]

  def saving(directory, *args, **kwargs):  # stops after the third epoch checkpoint
    save(directory, *args, **kwargs)
    saved.append(Path(directory).name)
    if len(saved) == stop_after[0]:
      raise KeyboardInterrupt

  monkeypatch.setattr(training, "save_checkpoint", saving)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "cut", resume=False)
  # The first row finished both its epochs, the second one of them (chunks of 10 steps).
  assert saved == ["00-sgd-tuned", "00-sgd-tuned", "01-eva-tuned"]
  runs = tmp_path / "cut" / "runs"
  (group,) = [d for d in runs.iterdir() if d.is_dir()]
  assert group.name.startswith("seed0-steps10-")
  saved.clear()
  stop_after[0] = 0
  resumed = run(tmp_path / "cut", resume=True)
  # The first row is not trained again; the second trains its last epoch only.
  assert "00-sgd-tuned" not in saved and saved.count("01-eva-tuned") == 1
  assert saved.count("04-eva-as-published") == 2
  assert [r.name for r in resumed.runs[0]] == [r.name for r in whole.runs[0]]
  for a, b in zip(whole.runs[0], resumed.runs[0]):
    assert b.step_losses == a.step_losses and b.test == a.test, a.name
    assert b.curvature == a.curvature and len(b.epoch_times) == 2, a.name
  assert not group.exists() and (runs / "seed0-steps10.json").is_file()
  # Without resume, a stopped group's checkpoints are dropped, not read: all run again.
  saved.clear()
  stop_after[0] = 3
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "cut", resume=False)
  saved.clear()
  stop_after[0] = 0
  again = run(tmp_path / "cut", resume=False)
  assert saved.count("00-sgd-tuned") == 2 and saved.count("01-eva-tuned") == 2
  assert again.runs[0][1].step_losses == whole.runs[0][1].step_losses
