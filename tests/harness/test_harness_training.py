"""The harness's training loop: interleaved trainers, evaluation every N steps, budgets,
steps and seconds to a target, on a tiny regression task the test builds itself."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from examples.harness import curvature, datasets, plots, report, targets, training
from examples.harness.optimizers import SPEC_BY_KEY, Options

pytestmark = pytest.mark.usefixtures("quick_compiles")
BATCH = 8


def tiny_task(steps_per_epoch: int = 4) -> training.Task:
  """Linear regression, 3 inputs, ``steps_per_epoch`` batches of 8 per epoch."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH * steps_per_epoch, 3)).astype(np.float32)
  y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
  test_x = rng.standard_normal((16, 3)).astype(np.float32)
  test_y = test_x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
  model = nn.Dense(1)

  def loss_fn(params, model_state, batch):
    inputs, targets = batch
    loss = jnp.mean(jnp.square(model.apply({"params": params}, inputs) - targets))
    return loss, (model_state, {})

  def eval_fn(params, model_state, batch):
    return {"loss": loss_fn(params, model_state, batch)[0]}

  return training.Task(
    name="tiny regression",
    init=lambda key: (model.init(key, jnp.zeros((1, 3)))["params"], {}),
    loss_fn=loss_fn,
    eval_fn=eval_fn,
    train_epoch=lambda r: datasets.batches((x, y), BATCH, rng=r),
    test_batches=lambda: iter([(test_x, test_y)]),
    steps_per_epoch=steps_per_epoch,
    example_batch=(x[:BATCH], y[:BATCH]),
    schedule=lambda lr, total: optax.linear_schedule(lr, 0.0, transition_steps=total),
    default_lrs={"sgd": 0.05, "eva": 0.05},
  )


@pytest.fixture(scope="module")
def task():
  return tiny_task()


def trainer(task, key="sgd", lr=0.05, **config):
  params, state = task.init(jax.random.PRNGKey(0))
  config = training.RunConfig(**{"epochs": 2, **config})
  return training.Trainer(task, SPEC_BY_KEY[key], lr, Options(), params, state, config)


def test_interleaved_trainers_equal_each_trained_alone_and_take_turns(task):
  alone = [trainer(task, "sgd"), trainer(task, "eva")]
  for t in alone:
    t.advance(100)
  together = [trainer(task, "sgd"), trainer(task, "eva")]
  turns = []
  for t in together:
    advance = t.advance
    t.advance = lambda n, t=t, advance=advance: (
      turns.append((t.result.key, advance(n))) or (turns[-1][1])
    )
  results = training.interleave(together, chunk=3)
  # 8 steps each, 3 at a time, round-robin: the last turn has the remaining 2.
  assert turns == [("sgd", 3), ("eva", 3), ("sgd", 3), ("eva", 3), ("sgd", 2), ("eva", 2)]
  for a, b in zip(alone, results):
    assert b.steps == 8 and a.result.step_losses == b.step_losses, b.name
    assert a.result.evals == b.evals and a.result.train == b.train, b.name
  # Same batches, other optimizers: the first losses agree, the later ones do not.
  assert results[0].step_losses[0] == results[1].step_losses[0]
  assert results[0].step_losses[-1] != results[1].step_losses[-1]
  # Eva's correction, recorded after step 1 and at 25/50/100 % of the 8 steps; SGD has none.
  assert results[0].curvature == {} and alone[1].result.curvature == results[1].curvature
  first = results[1].curvature["largest_ratio"][0]
  assert first == pytest.approx(_first_batch_ratio(task, 0.03), rel=1e-5)  # float32 capture


def _first_batch_ratio(task, gamma):
  """Eva's ρ = s/(s + γ), s = (‖ā‖² + 1)‖ḡ‖² (the bias's 1), of the tiny task's Dense(1)
  after step 1, by hand: ā the first batch's mean input, ḡ the mean over the batch of the
  gradient of the mean squared error w.r.t. the output, at the initial parameters."""
  params, _ = task.init(jax.random.PRNGKey(0))
  x, y = (np.asarray(v, np.float64) for v in next(iter(task.train_epoch(np.random.default_rng(0)))))
  out = x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
  a, g = x.mean(0), (2 * (out - y) / y.size).mean(0)
  s = (a @ a + 1) * (g @ g)
  return s / (s + gamma)


def test_the_trainer_records_where_the_rank_one_correction_is_negligible(task):
  """Into ``Result.curvature``: after steps 1, 2, 4, 8 of 8, the fraction of layers and
  parameters where ρ < 1e-3, with γ from the options: 1e6 makes Eva's correction
  negligible everywhere (ρ ≈ s/γ); Eva-f's ρ ≥ 1/(1 + γ) on a layer with a bias, never.
  The report's table has a row for each and says SGD has no such correction."""
  params, state = task.init(jax.random.PRNGKey(0))
  config = training.RunConfig(epochs=2)
  runs = [
    training.Trainer(task, SPEC_BY_KEY[key], 0.05, options, params, state, config)
    for key, options in (("eva", Options(damping=1e6)), ("eva-f", Options()))
  ]
  big_gamma, foof = training.interleave(runs, chunk=8)
  assert big_gamma.curvature["steps"] == foof.curvature["steps"] == [1, 2, 4, 8]
  assert big_gamma.curvature["of_layers"] == big_gamma.curvature["of_parameters"] == [1.0] * 4
  assert big_gamma.curvature["largest_ratio"][0] == pytest.approx(
    _first_batch_ratio(task, 1e6), rel=1e-5
  )
  assert (big_gamma.curvature["layers"], big_gamma.curvature["parameters"]) == (1, 4)
  assert foof.curvature["rules"] == ["eva-f"] and foof.curvature["of_layers"] == [0.0] * 4
  assert min(foof.curvature["largest_ratio"]) >= 1 / 1.03
  # The last value is the library's on the trainer's final state.
  final = eva_optax.negligible_fraction(runs[1].params, runs[1].opt_state, damping=0.03)
  assert foof.curvature["largest_ratio"][-1] == pytest.approx(
    float(final.ratios[""])
  )  # one Dense: path ()
  table = curvature.curvature_table([_result("sgd", [1.0]), big_gamma, foof]).splitlines()
  assert "| Eva | 0.05 | 1 (4) | 1 / 2 / 4 / 8 | 1.00 / 1.00 / 1.00 / 1.00 |" in table[4]
  assert table[5].startswith("| Eva-f | 0.05 | 1 (4) | 1 / 2 / 4 / 8 | 0.00 / 0.00 /")
  assert table[-1] == "Not applicable (no rank-one correction): SGD."
  # Seeds share a row: medians [min–max] where they differ.
  other = dict(foof.curvature, of_layers=[0.0, 0.001, 0.5, 0.999])
  seeds = [foof, dataclasses.replace(foof, curvature=other)]
  row = curvature.curvature_table(seeds).splitlines()[4]
  assert "| 0.00 / <0.01 [0.00–<0.01] / 0.25 [0.00–0.50] / 0.50 [0.00–>0.99] |" in row


def test_evaluation_every_n_steps_and_at_every_epoch_end(task):
  t = trainer(task, eval_every=3)  # 2 epochs of 4 steps
  t.advance(100)
  r = t.result
  assert r.eval_steps == [3, 4, 6, 8]
  assert len(r.eval_times) == 4 and r.eval_times == sorted(r.eval_times)
  assert r.eval_times[-1] == r.step_times[-1]  # the clock stops at the last step
  assert r.test["loss"] == [r.evals["loss"][1], r.evals["loss"][3]]  # the epoch ends
  assert r.evals["loss"][-1] < r.evals["loss"][0]  # it learns
  plain = trainer(task)
  plain.advance(100)
  assert plain.result.eval_steps == [4, 8]
  assert plain.result.step_losses == r.step_losses  # evaluating changes no step


def test_a_budget_in_steps_ends_in_a_partial_epoch(task):
  t = trainer(task, steps=6)
  assert t.remaining == 6
  assert t.advance(5) == 5 and t.advance(5) == 1 and t.done and t.advance(5) == 0
  r = t.result
  assert (r.steps, r.epochs_done, r.budget_steps) == (6, 2, 6)
  assert r.eval_steps == [4, 6] and len(r.train["loss"]) == 2
  assert r.seconds_per_epoch == pytest.approx(sum(r.epoch_times) / 6 * 4)


def test_a_diverging_trainer_stops_at_its_first_non_finite_loss(task):
  t = trainer(task, lr=1e30)
  assert t.advance(100) < 8 and t.done and t.result.diverged
  assert not math.isfinite(t.result.step_losses[-1])
  assert all(math.isfinite(v) for v in t.result.step_losses[:-1])
  assert t.result.evals == {}  # nothing evaluated after a divergence


def _result(key, losses, evals=None, eval_steps=(), eval_times=()):
  return training.Result(
    key,
    key.upper(),
    0.1,
    step_losses=list(losses),
    step_times=[0.5 * (i + 1) for i in range(len(losses))],
    evals={"accuracy": list(evals)} if evals is not None else {},
    eval_steps=list(eval_steps),
    eval_times=list(eval_times),
  )


def test_steps_and_seconds_to_a_target_by_hand():
  loss = training.Target("train_loss")
  # Trailing means of 2: 3.5, 2.5, 1.5, 1.0 -> at or below 2.0 first at step 4.
  r = _result("eva", [4, 3, 2, 1, 1])
  assert targets.reach(r, loss, 2.0, window=2) == (4, 2.0)
  assert targets.reach(r, loss, 0.5, window=2) is None
  assert targets.final_quality(r, loss, window=2) == 1.0
  assert targets.final_quality(r, loss, window=3) == pytest.approx(4 / 3)

  accuracy = training.Target("test_accuracy", higher_is_better=True)
  r = _result(
    "eva", [1] * 9, evals=[0.5, 0.7, 0.8], eval_steps=[3, 6, 9], eval_times=[1.0, 2.5, 4.0]
  )
  assert targets.reach(r, accuracy, 0.7) == (6, 2.5)
  assert targets.reach(r, accuracy, 0.81) is None
  assert targets.final_quality(r, accuracy) == 0.8

  sgd = _result(
    "sgd",
    [1] * 12,
    evals=[0.4, 0.6, 0.7, 0.75],
    eval_steps=[3, 6, 9, 12],
    eval_times=[2.0, 4.0, 6.0, 8.0],
  )
  value = targets.set_times_to_target([sgd, r], accuracy, window=10)
  assert value == 0.75
  assert (sgd.steps_to_target, sgd.time_to_target) == (12, 8.0)
  assert (r.steps_to_target, r.time_to_target) == (9, 4.0)
  table = report.markdown_table([sgd, r], accuracy, value)
  assert "| EVA | 0.1 |" in table and "| 9 | 0.75 | 4.0 s | 0.50 |" in table


def _loss_run(key, losses, test_losses):
  r = _result(key, losses, eval_steps=[2, 4], eval_times=[1.0, 2.0])
  r.evals, r.test = {"loss": list(test_losses)}, {"loss": [test_losses[-1]]}
  r.train = {"loss": [float(np.mean(losses))]}
  r.steps, r.steps_per_epoch = len(losses), len(losses)
  return r


def test_the_report_has_one_final_quality_and_tells_the_splits_by_line_style():
  loss = training.Target("train_loss")
  sgd = _loss_run("sgd", [4, 3, 2, 1, 1], [3.0, 1.5])
  eva = _loss_run("eva", [3, 2, 1, 0.5, 0.5], [2.0, 1.0])
  value = targets.set_times_to_target([sgd, eva], loss, window=2)
  assert value == 1.0  # SGD's mean of its last 2 step losses, not its epoch mean (2.2)
  assert (eva.steps_to_target, sgd.steps_to_target) == (4, 5)  # means 0.75 and 1.0
  table = report.markdown_table([sgd, eva], loss, value, window=2)
  head = table.splitlines()[0]
  assert "| final train loss (mean of the last 2 step losses) |" in head
  assert "| steps to SGD's final train loss (mean of the last 2 step losses) = 1 |" in head
  assert "| train loss (last epoch's mean) |" in head
  assert "| SGD | 0.1 | 1 | 2.2 | 1.5 |" in table  # the same quantity as the header's
  assert "| EVA | 0.1 | 0.5 | 1.4 | 1 |" in table
  # The terminal's summary: six short columns, their definitions below.
  summary = report.summary_table([sgd, eva], loss, value, window=2, details="out/results.md")
  rows = summary.splitlines()
  assert rows[0].split() == ["optimizer", "lr", "final", "steps", "×", "SGD", "time"]
  assert rows[2].split()[:5] == ["SGD", "0.1", "1", "5", "1.00"]
  assert rows[3].split()[:5] == ["EVA", "0.1", "0.5", "4", "0.80"]
  assert "final  train loss (mean of the last 2 step losses) at the end" in summary
  assert "first reaches SGD's final value, 1 (–: never)" in summary
  assert "out/results.md" in summary

  by_epoch, by_time = plots.figures_of(
    [sgd, eva], "t", loss, value, window=2, labels={"loss": "MSE"}
  )
  train_ax, test_ax = by_epoch.axes
  assert (train_ax.get_ylabel(), test_ax.get_ylabel()) == ("train MSE", "test MSE")
  assert {l.get_linestyle() for l in train_ax.lines} == {"-"}
  assert {l.get_linestyle() for l in test_ax.lines} == {"--"}
  # One legend entry per optimizer and one per split, not one per optimizer and split.
  # The legend is the figure's, outside the axes.
  assert train_ax.get_legend() is None and len(by_epoch.legends) == 1
  assert [t.get_text() for t in by_epoch.legends[0].get_texts()] == ["SGD", "EVA", "train", "test"]
  time_ax, steps_ax, tail_ax = by_time.axes
  assert time_ax.get_ylabel() == steps_ax.get_ylabel() == tail_ax.get_ylabel() == "MSE"
  # The third panel: the train line (the target's split) past half the 5 steps, its y range
  # from the best value there (Eva's 0.5) to the worst final one (SGD's 1.0), 5 % margin.
  assert tail_ax.get_xlim()[0] == 2.5 and tail_ax.get_yscale() == "linear"
  np.testing.assert_allclose(tail_ax.get_ylim(), (0.475, 1.025))
  tail_lines = [l for l in tail_ax.lines if l.get_linestyle() == "-" and l.get_marker() != "x"]
  assert [list(l.get_xdata()) for l in tail_lines] == [[3, 4, 5]] * 2
  assert not [l for l in tail_ax.lines if l.get_linestyle() == "--"]  # no test split
  assert steps_ax.get_xlabel() == "steps" and "wall time" in time_ax.get_xlabel()
  assert [t.get_text() for t in by_time.legends[0].get_texts()] == [
    "SGD",
    "EVA",
    "train (mean of the last 2 steps)",
    "test",
    "train (each step)",
    "SGD's final train loss (mean of the last 2 step losses) = 1",
    "first reached",
  ]
  # Eva's family is drawn thicker than the others.
  sgd_handle, eva_handle = by_time.legends[0].legend_handles[:2]
  assert eva_handle.get_linewidth() > sgd_handle.get_linewidth()
  crossings = [l for l in steps_ax.lines if l.get_marker() == "x"]
  assert sorted(float(l.get_xdata()[0]) for l in crossings) == [4.0, 5.0]
  assert all(float(l.get_ydata()[0]) == 1.0 for l in crossings)
  target_lines = [l for l in steps_ax.lines if l.get_linestyle() == ":"]
  assert len(target_lines) == 1 and list(target_lines[0].get_ydata()) == [1.0, 1.0]
  import matplotlib.pyplot as plt

  plt.close(by_epoch)
  plt.close(by_time)
  # Higher is better (an accuracy): from the worst final value up to the best reached.
  tails = [(np.array([0.8, 0.9]), np.array([0.9])), (np.array([0.7, np.nan]), np.array([0.85]))]
  np.testing.assert_allclose(plots.tail_limits(tails, 0.88, True), (0.8475, 0.9025))
  assert plots.tail_limits([(np.array([np.nan]), np.array([np.nan]))], 1.0, False) is None
  # Thirteen runs (the protocol's tuned and "as published" rows): thirteen colours.
  many = [_loss_run(f"opt{i}", [4, 3, 2, 1, 1], [3.0, 1.5]) for i in range(13)]
  by_epoch, by_time = plots.figures_of(many, "t", loss, value, window=2)
  handles = by_epoch.legends[0].legend_handles[:13]
  assert len({tuple(plt.matplotlib.colors.to_rgba(h.get_color())) for h in handles}) == 13
  plt.close(by_epoch)
  plt.close(by_time)
