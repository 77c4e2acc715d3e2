"""The tuning protocol: every optimizer tuned the same way, then trained on several seeds.

1. **Tuning**, on a validation split held out of the training set
   (``Protocol.validation_fraction`` of it, the same samples for every point; the test set
   is not read), each point a whole schedule over ``Protocol.tune_fraction`` of the
   budget's steps, from the initial parameters and batches of seed ``tune_seed``:

   a. learning rate: ``lr_points`` (at least 5) values, log-spaced by ``lr_step`` (half a
      decade), centred on the example's own rate for the optimizer; when the best is at an
      edge, the grid grows past it one point at a time, at most ``max_extensions`` times;
   b. damping, for the optimizers that take one (Eva, Eva-f, Eva-s, K-FAC, FOOF, Shampoo):
      ``damping_factors`` × its default, at the chosen learning rate;
   c. KL clip, for Eva (``kl_clip_for``): ``kl_clip_factors`` × its default, at the chosen
      learning rate and damping.

   A point's score is the validation value of the task's target metric at the end of its
   run (the validation loss where the target is the training loss). A diverged run scores
   worst; of equal scores the point tried first wins.
2. **Final runs**: every optimizer with its chosen values on the whole training set, the
   whole budget, evaluated on the test set, once per seed of ``seeds``, all interleaved;
   beside them the paper's recipe, "as published" (``Task.published_lrs``; by default the
   CIFAR recipe's single learning rate 0.1 for SGD, K-FAC and Eva), with the default
   damping and KL clip.
3. **Budget to quality** (:func:`budget_summary`): the tuned values again, each time with a
   whole schedule over ``budgets`` (25, 50, 75 and 100 %) of the budget (SGD's epochs),
   seeds ``budget_seeds``. Reported per optimizer: the shortest budget whose final quality
   reaches SGD's at the whole budget in the same seed, in steps and in training seconds and
   as ratios to SGD's whole budget -- the paper's "fewer epochs to the same accuracy" --
   next to the crossing measure of part 2 (the first step of the whole-budget run at SGD's
   final quality), which under one decaying schedule mostly measures the schedule.

The quality and the target follow one definition (:func:`examples.harness.report.final_quality`):
the mean of the last ``window`` step losses for a training-loss target, the last evaluation
for a test metric. :func:`run_protocol` runs all three and writes ``protocol.md`` and
``protocol.json``, grids and chosen values included; ``benchmarks/protocol.py`` is its
command line. Given an earlier run's ``protocol.json`` (``recorded``), it reads part 1
from it (:func:`recorded_tuning`, which refuses a record tuned with other settings) and
runs parts 2 and 3 only: more seeds without tuning again.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import jax

from . import report
from .optimizers import SPEC_BY_KEY, Options, Spec
from .training import Result, RunConfig, Target, Task, Trainer, from_json, interleave, jsonable

# The Eva paper's CIFAR recipe: one learning rate for SGD, K-FAC and Eva.
PUBLISHED_LR = 0.1
PUBLISHED_KEYS = ("sgd", "kfac", "eva")


@dataclass(frozen=True)
class Protocol:
  """The settings of the protocol (see the module docstring)."""

  lr_points: int = 5
  lr_step: float = 10**0.5
  max_extensions: int = 2
  damping_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
  kl_clip_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
  kl_clip_for: tuple[str, ...] = ("eva",)
  tune_fraction: float = 0.25
  validation_fraction: float = 0.1
  tune_seed: int = 0
  seeds: tuple[int, ...] = (0, 1, 2)
  budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
  budget_seeds: tuple[int, ...] | None = None  # None: ``seeds``; a subset of them

  def __post_init__(self) -> None:
    if self.lr_points < 5:
      raise ValueError(f"lr_points must be at least 5, got {self.lr_points}")
    if not self.lr_step > 1:
      raise ValueError(f"lr_step must be above 1, got {self.lr_step}")
    if not 0 < self.tune_fraction <= 1:
      raise ValueError(f"tune_fraction must lie in (0, 1], got {self.tune_fraction}")
    if not 0 < self.validation_fraction < 1:
      raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")
    if not self.seeds:
      raise ValueError("seeds: at least one")
    if any(not 0 < b <= 1 for b in self.budgets) or list(self.budgets) != sorted(set(self.budgets)):
      raise ValueError(f"budgets must rise within (0, 1], got {self.budgets}")
    if not set(self.budget_seeds or ()) <= set(self.seeds):
      raise ValueError(
        f"budget_seeds {self.budget_seeds} must be among the seeds "
        f"{self.seeds} (their whole-budget runs are the reference)"
      )

  def tune_steps(self, budget_steps: int) -> int:
    """The steps of one tuning run: ``tune_fraction`` of the budget's (at least 1)."""
    return max(1, round(self.tune_fraction * budget_steps))

  @property
  def seeds_for_budgets(self) -> tuple[int, ...]:
    return self.seeds if self.budget_seeds is None else self.budget_seeds


def significant(value: float) -> float:
  """``value`` to 3 significant digits (the grids' and the knob study's values)."""
  return float(f"{value:.3g}")


def lr_grid(center: float, points: int = 5, step: float = 10**0.5) -> list[float]:
  """``points`` learning rates log-spaced by ``step`` with ``center`` in the middle
  (3 significant digits; for an even count the extra point is above)."""
  low = -((points - 1) // 2)
  return [significant(center * step**k) for k in range(low, low + points)]


def lr_beyond(center: float, grid: Sequence[float], step: float, upwards: bool) -> float:
  """The next point of ``center``'s log-spaced grid past the top (or bottom) of ``grid``."""
  k = round(
    math.log(max(grid) if upwards else min(grid)) / math.log(step)
    - math.log(center) / math.log(step)
  )
  return significant(center * step ** (k + 1 if upwards else k - 1))


def scaled(default: float, factors: Sequence[float]) -> list[float]:
  """``default`` times each factor (3 significant digits)."""
  return [significant(default * f) for f in factors]


def default_of(spec: Spec, argument: str) -> float | None:
  """The constructor's default for ``argument`` (None: it has none)."""
  if not spec.accepts(argument):
    return None
  default = inspect.signature(spec.factory).parameters[argument].default
  return None if default is inspect.Parameter.empty else float(default)


@dataclass(frozen=True)
class Point:
  """One setting of an optimizer (``None``: the optimizer's default)."""

  lr: float
  damping: float | None = None
  kl_clip: float | None = None
  # More fields of :class:`Options` (e.g. ``(("stat_decay", 0.2),)``), for the knob study.
  extra: tuple[tuple[str, Any], ...] = ()

  def options(self, base: Options) -> Options:
    return replace(base, damping=self.damping, kl_clip=self.kl_clip, **dict(self.extra))

  def label(self) -> str:
    parts = [f"lr {self.lr:g}"]
    parts += [f"damping {self.damping:g}"] if self.damping is not None else []
    parts += [f"kl_clip {self.kl_clip:g}"] if self.kl_clip is not None else []
    parts += [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.extra]
    return ", ".join(parts)


@dataclass
class Trial:
  stage: str  # "lr" | "damping" | "kl_clip"
  point: Point
  score: float


class Search:
  """The tuning of one optimizer, stage by stage: :meth:`pending` gives the points to run
  now, :meth:`record` takes their scores; empty ``pending()``: done, see :attr:`best`."""

  def __init__(
    self, spec: Spec, center_lr: float, protocol: Protocol, higher_is_better: bool
  ) -> None:
    self.spec, self.protocol, self.higher_is_better = spec, protocol, higher_is_better
    self.trials: list[Trial] = []
    self.center_lr = center_lr
    self.grids: dict[str, list[float]] = {
      "lr": lr_grid(center_lr, protocol.lr_points, protocol.lr_step)
    }
    self.stage = "lr"
    self._queue = [Point(lr) for lr in self.grids["lr"]]
    self._extensions = 0

  @classmethod
  def recorded(
    cls, spec: Spec, record: dict[str, Any], protocol: Protocol, higher_is_better: bool
  ) -> Search:
    """The finished search that ``record`` (an entry of ``protocol.json``'s
    ``tuning``) describes: its grids, its trials in order, nothing pending. Raises
    RecordMismatch when the record's chosen values are not those of its best trial."""
    search = cls(spec, record["grids"]["lr"][0], protocol, higher_is_better)
    search.grids = {k: list(v) for k, v in record["grids"].items()}
    search.trials = [
      Trial(
        t["stage"],
        Point(t["lr"], t["damping"], t["kl_clip"], tuple(tuple(e) for e in t.get("extra", ()))),
        float(from_json(t["score"])),
      )
      for t in record["trials"]
    ]
    search._queue, search.stage = [], "done"
    if search.chosen() != record["chosen"]:
      raise RecordMismatch(
        f"{spec.name}: the recorded choice {record['chosen']} is "
        f"not its best trial's {search.chosen()}"
      )
    return search

  def pending(self) -> list[Point]:
    return list(self._queue)

  def _key(self, trial: Trial) -> float:
    s = trial.score
    if not math.isfinite(s):
      return -math.inf
    return s if self.higher_is_better else -s

  @property
  def best(self) -> Trial:
    """The best trial so far (the first of equal ones)."""
    if not self.trials:
      raise ValueError(f"{self.spec.name}: no trial scored yet")
    best = self.trials[0]
    for t in self.trials[1:]:
      if self._key(t) > self._key(best):
        best = t
    return best

  def record(self, point: Point, score: float) -> None:
    self._queue.remove(point)  # ValueError for a point that is not pending
    self.trials.append(Trial(self.stage, point, float(score)))
    if not self._queue:
      self._next()

  def _next(self) -> None:
    if self.stage == "lr":
      best = self.best.point.lr
      lrs = self.grids["lr"]
      if self._extensions < self.protocol.max_extensions and best in (min(lrs), max(lrs)):
        beyond = lr_beyond(self.center_lr, lrs, self.protocol.lr_step, upwards=best == max(lrs))
        self._extensions += 1
        self.grids["lr"] = sorted(lrs + [beyond])
        self._queue = [Point(beyond)]
        return
      self.stage = "damping"
      default = default_of(self.spec, "damping")
      if default is not None:
        self.grids["damping"] = scaled(default, self.protocol.damping_factors)
        self._queue = [
          replace(self.best.point, damping=d) for d in self.grids["damping"] if d != default
        ]
        if self._queue:
          return
    if self.stage == "damping":
      self.stage = "kl_clip"
      default = default_of(self.spec, "kl_clip")
      if default is not None and self.spec.key in self.protocol.kl_clip_for:
        self.grids["kl_clip"] = scaled(default, self.protocol.kl_clip_factors)
        self._queue = [
          replace(self.best.point, kl_clip=k) for k in self.grids["kl_clip"] if k != default
        ]
        if self._queue:
          return
    self.stage = "done"

  def chosen(self) -> dict[str, float | None]:
    """The chosen values, defaults spelled out (None: the optimizer has no such knob)."""
    p = self.best.point
    return {
      "lr": p.lr,
      "damping": p.damping if p.damping is not None else default_of(self.spec, "damping"),
      "kl_clip": p.kl_clip if p.kl_clip is not None else default_of(self.spec, "kl_clip"),
    }


def validation_target(target: Target) -> Target:
  """What a tuning point is scored by: the target's metric on the validation split (the
  loss where the target is the training loss)."""
  if target.metric == "train_loss":
    return Target("test_loss", higher_is_better=False)
  return target


def tune(
  make_task: Callable[[float], Task],
  specs: Sequence[Spec],
  protocol: Protocol,
  base: Options,
  budget_steps: int,
  chunk: int = 10,
) -> dict[str, Search]:
  """Tune every optimizer of ``specs`` (part 1 of the protocol); ``make_task(f)`` builds
  the task with a validation fraction ``f`` held out of the training set."""
  task = make_task(protocol.validation_fraction)
  scored_by = validation_target(task.target)
  params, model_state = task.init(jax.random.PRNGKey(protocol.tune_seed))
  config = RunConfig(epochs=1, seed=protocol.tune_seed, steps=protocol.tune_steps(budget_steps))
  searches = {}
  for spec in specs:
    if spec.key not in task.default_lrs:
      raise SystemExit(f"{task.name}: no learning rate of {spec.key} to centre its grid on")
    search = Search(spec, task.default_lrs[spec.key], protocol, scored_by.higher_is_better)
    while points := search.pending():
      print(f"--- tuning {spec.name}, {search.stage}: " + "; ".join(p.label() for p in points))
      trainers = [
        Trainer(
          task,
          spec,
          p.lr,
          p.options(base),
          params,
          model_state,
          config,
          name=f"{spec.name} {p.label()}",
        )
        for p in points
      ]
      for p, r in zip(points, interleave(trainers, chunk)):
        search.record(p, report.final_quality(r, scored_by))
    searches[spec.key] = search
  return searches


class RecordMismatch(ValueError):
  """A recorded tuning that cannot stand for this protocol's (:func:`recorded_tuning`)."""


# The settings of part 1: a recorded tuning stands for this protocol's only where they agree.
TUNING_FIELDS = (
  "lr_points",
  "lr_step",
  "max_extensions",
  "damping_factors",
  "kl_clip_factors",
  "kl_clip_for",
  "tune_fraction",
  "validation_fraction",
  "tune_seed",
)


def recorded_tuning(
  document: dict[str, Any],
  specs: Sequence[Spec],
  protocol: Protocol,
  higher_is_better: bool,
  steps: int,
) -> dict[str, Search]:
  """Part 1 as an earlier run recorded it (``document``: its ``protocol.json``), so that
  the final runs can take other seeds without tuning again. Raises RecordMismatch, naming
  what differs, when the record was tuned with other settings (:data:`TUNING_FIELDS`,
  the steps of a tuning run) or lacks an optimizer of ``specs``."""
  recorded = document["protocol"]
  for name in TUNING_FIELDS:
    mine = jsonable(getattr(protocol, name))
    if recorded.get(name) != mine:
      raise RecordMismatch(
        f"the recorded tuning has {name} {recorded.get(name)}, this protocol {mine}"
      )
  by_key = {t["key"]: t for t in document["tuning"].values()}
  searches = {}
  for spec in specs:
    if spec.key not in by_key:
      raise RecordMismatch(
        f"the recorded tuning has no {spec.name} (it has {', '.join(sorted(by_key))})"
      )
    if by_key[spec.key]["steps"] != steps:
      raise RecordMismatch(
        f"the recorded tuning ran {by_key[spec.key]['steps']} steps "
        f"per point, this budget's {steps}"
      )
    searches[spec.key] = Search.recorded(spec, by_key[spec.key], protocol, higher_is_better)
  return searches


@dataclass(frozen=True)
class Row:
  """One optimizer setting of the final runs."""

  name: str
  spec: Spec
  point: Point
  variant: str = "tuned"  # "tuned" | "as published"


def rows_of(searches: dict[str, Search], task: Task) -> list[Row]:
  """The tuned rows (SGD first: it sets the target), then the "as published" ones."""
  tuned = [Row(s.spec.name, s.spec, s.best.point) for s in searches.values()]
  tuned.sort(key=lambda row: row.spec.key != "sgd")
  published = task.published_lrs or {k: PUBLISHED_LR for k in PUBLISHED_KEYS}
  return tuned + [
    Row(f"{SPEC_BY_KEY[k].name} (as published)", SPEC_BY_KEY[k], Point(lr), "as published")
    for k, lr in published.items()
  ]


def final_runs(
  task: Task,
  rows: Sequence[Row],
  seeds: Sequence[int],
  epochs: int,
  base: Options,
  *,
  eval_every: int = 0,
  chunk: int = 10,
  window: int = 10,
  fraction: float = 1.0,
) -> list[list[Result]]:
  """Every row on ``task`` once per seed, interleaved, a whole schedule over ``fraction``
  of ``epochs``; the times to SGD's final quality of the same seed filled in."""
  runs = []
  steps = max(1, round(fraction * epochs * task.steps_per_epoch))
  for seed in seeds:
    params, model_state = task.init(jax.random.PRNGKey(seed))
    config = RunConfig(epochs=epochs, seed=seed, eval_every=eval_every, steps=steps)
    print(f"--- {task.name}: seed {seed}, {steps} steps ({fraction:.0%} of the budget)")
    trainers = [
      Trainer(
        task,
        row.spec,
        row.point.lr,
        row.point.options(base),
        params,
        model_state,
        config,
        name=row.name,
      )
      for row in rows
    ]
    results = interleave(trainers, chunk)
    report.set_times_to_target(results, task.target, window)
    runs.append(results)
  return runs


def stats(values: Sequence[float | None]) -> dict[str, float] | None:
  """Median, min, max and count of the finite values (None: there are none)."""
  got = [v for v in values if v is not None and math.isfinite(v)]
  if not got:
    return None
  return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def ratios_to(
  runs: Sequence[Sequence[Result]], reference: str, target: Target, window: int
) -> dict[str, dict[str, Any]]:
  """Per row (by name): the steps and seconds until it first reaches the final quality
  of the row named ``reference`` in the same seed, as ratios to that row's own steps and
  seconds to it (medians [spread] over the seeds where both got there), and in how
  many seeds it did."""
  out: dict[str, dict[str, Any]] = {}
  for i, first in enumerate(runs[0]):
    steps, times = [], []
    for results in runs:
      ref = next(r for r in results if r.name == reference)
      value = report.final_quality(ref, target, window)
      mine = report.reach(results[i], target, value, window)
      own = report.reach(ref, target, value, window)
      got = mine is not None and own is not None
      steps.append(mine[0] / own[0] if got else None)
      times.append(mine[1] / own[1] if got and own[1] else None)
    out[first.name] = {
      "steps_ratio": stats(steps),
      "time_ratio": stats(times),
      "reached": sum(s is not None for s in steps),
      "seeds": len(runs),
    }
  return out


def summarise(runs: Sequence[Sequence[Result]], target: Target, window: int) -> dict[str, Any]:
  """Per row (by name), over seeds: final quality, steps and seconds to SGD's final quality
  and their ratios to SGD's (in the same seed): median, min, max; how many reached it."""
  out: dict[str, Any] = {}
  sgd_name = next(r.name for r in runs[0] if r.key == "sgd")
  ratios = ratios_to(runs, sgd_name, target, window)
  for i, first in enumerate(runs[0]):
    per_seed = [results[i] for results in runs]
    out[first.name] = {
      "key": first.key,
      "lr": first.lr,
      "seeds": len(per_seed),
      "reached": sum(r.steps_to_target is not None for r in per_seed),
      "diverged": sum(r.diverged for r in per_seed),
      "final": stats([report.final_quality(r, target, window) for r in per_seed]),
      "steps_to_target": stats([r.steps_to_target for r in per_seed]),
      "steps_ratio": ratios[first.name]["steps_ratio"],
      "time_to_target_s": stats([r.time_to_target for r in per_seed]),
      "time_ratio": ratios[first.name]["time_ratio"],
      "seconds_per_epoch": stats([r.seconds_per_epoch for r in per_seed]),
    }
  return out


def spread(s: dict[str, float] | None, fmt: str, missing: str = "–") -> str:
  """``median [min–max]`` of :func:`stats`'s dict (``missing`` for None)."""
  if s is None:
    return missing
  if s["n"] == 1 or s["min"] == s["max"]:
    return format(s["median"], fmt)
  return f"{format(s['median'], fmt)} [{format(s['min'], fmt)}–{format(s['max'], fmt)}]"


def _g(v: float | None) -> str:
  return "–" if v is None else f"{v:g}"


def tuning_tables(searches: dict[str, Search], scored_by: Target, steps: int) -> str:
  """The grids, the chosen values and every trial's validation score."""
  metric = scored_by.metric.partition("_")[2]
  lines = [
    f"Scored by the validation {metric} ({'higher' if scored_by.higher_is_better else 'lower'}"
    f" is better) after a whole schedule of {steps} steps.\n",
    "| optimizer | lr grid | damping grid | kl_clip grid | chosen lr | chosen damping "
    f"| chosen kl_clip | validation {metric} |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for s in searches.values():
    c = s.chosen()
    grid = lambda k: ", ".join(f"{v:g}" for v in s.grids[k]) if k in s.grids else "–"
    lines.append(
      f"| {s.spec.name} | {grid('lr')} | {grid('damping')} | {grid('kl_clip')} "
      f"| {_g(c['lr'])} | {_g(c['damping'])} | {_g(c['kl_clip'])} "
      f"| {s.best.score:.5g} |"
    )
  lines += ["", f"| optimizer | stage | setting | validation {metric} |", "|---|---|---|---|"]
  for s in searches.values():
    best = s.best
    for t in s.trials:
      mark = " (chosen)" if t is best else ""
      lines.append(f"| {s.spec.name} | {t.stage} | {t.point.label()}{mark} | {t.score:.5g} |")
  return "\n".join(lines) + "\n"


def final_table(
  summary: dict[str, Any],
  rows: Sequence[Row],
  target: Target,
  window: int,
  sgd_value: dict[str, float] | None,
) -> str:
  """One row per setting: medians over seeds [min–max]."""
  what = report.quality_definition(target, window)
  tv = spread(sgd_value, ".5g")
  head = [
    "optimizer",
    "lr",
    "damping",
    "kl_clip",
    f"final {what}",
    f"steps to SGD's final ({tv})",
    "× SGD's steps",
    "time to it (s)",
    "× SGD's time",
    "reached",
    "s/epoch",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    s = summary[row.name]
    p = row.point
    damping = p.damping if p.damping is not None else default_of(row.spec, "damping")
    kl_clip = p.kl_clip if p.kl_clip is not None else default_of(row.spec, "kl_clip")
    lines.append(
      "| "
      + " | ".join(
        [
          row.name,
          f"{p.lr:g}",
          _g(damping),
          _g(kl_clip),
          spread(s["final"], ".5g"),
          spread(s["steps_to_target"], ".0f"),
          spread(s["steps_ratio"], ".2f"),
          spread(s["time_to_target_s"], ".1f"),
          spread(s["time_ratio"], ".2f"),
          f"{s['reached']}/{s['seeds']}",
          spread(s["seconds_per_epoch"], ".1f"),
        ]
      )
      + " |"
    )
  return "\n".join(lines) + "\n"


@dataclass
class Outcome:
  """Everything :func:`run_protocol` measured."""

  searches: dict[str, Search]
  rows: list[Row]
  runs: list[list[Result]]
  summary: dict[str, Any]
  sgd_value: dict[str, float] | None
  budgets: dict[str, Any] = field(default_factory=dict)  # budget_summary's; {}: not run


def run_protocol(
  make_task: Callable[[float], Task],
  specs: Sequence[Spec],
  protocol: Protocol,
  base: Options,
  epochs: int,
  out: Path,
  *,
  title: str,
  eval_every: int = 0,
  chunk: int = 10,
  window: int = 10,
  settings: dict[str, Any] | None = None,
  recorded: dict[str, Any] | None = None,
) -> Outcome:
  """The three parts of the protocol (the third when ``protocol.budgets`` holds a
  fraction below 1); writes ``protocol.md``, ``protocol.json`` and, per seed, the example's
  report of the final runs (``seed<n>/``) into ``out``. With ``recorded`` (an earlier
  run's ``protocol.json``), part 1 is read from it (:func:`recorded_tuning`) instead of
  run."""
  task = make_task(0.0)
  budget_steps = epochs * task.steps_per_epoch
  tune_steps = protocol.tune_steps(budget_steps)
  if recorded is None:
    searches = tune(make_task, specs, protocol, base, budget_steps, chunk)
  else:
    searches = recorded_tuning(
      recorded, specs, protocol, validation_target(task.target).higher_is_better, tune_steps
    )
  rows = rows_of(searches, task)
  runs = final_runs(
    task, rows, protocol.seeds, epochs, base, eval_every=eval_every, chunk=chunk, window=window
  )
  summary = summarise(runs, task.target, window)
  sgd_value = summary[rows[0].name]["final"] if rows[0].spec.key == "sgd" else None
  outcome = Outcome(searches, rows, runs, summary, sgd_value)
  if any(b < 1 for b in protocol.budgets):
    tuned = [row for row in rows if row.variant == "tuned"]
    seeds = protocol.seeds_for_budgets
    whole = [runs[protocol.seeds.index(seed)][: len(tuned)] for seed in seeds]
    by_budget = {
      b: (
        whole
        if b == 1
        else final_runs(task, tuned, seeds, epochs, base, chunk=chunk, window=window, fraction=b)
      )
      for b in protocol.budgets
    }
    outcome.budgets = budget_summary(
      by_budget, task.target, window, summary={row.name: summary[row.name] for row in tuned}
    )
  write(
    outcome,
    task,
    protocol,
    out,
    title=title,
    epochs=epochs,
    window=window,
    tune_steps=tune_steps,
    settings=settings or {},
  )
  return outcome


def shortest_budget(
  quality: dict[float, float], reference: float, higher_is_better: bool
) -> float | None:
  """The smallest budget (fraction) whose final ``quality`` reaches ``reference`` (None:
  none does, or the reference is not finite)."""
  if not math.isfinite(reference):
    return None
  for budget in sorted(quality):
    q = quality[budget]
    if math.isfinite(q) and (q >= reference if higher_is_better else q <= reference):
      return budget
  return None


def budget_summary(
  by_budget: dict[float, Sequence[Sequence[Result]]],
  target: Target,
  window: int,
  summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Part 3 from its runs: ``by_budget[fraction][seed index][row]``, SGD first in every
  list, the whole budget (1) among the fractions.

  Per row, over seeds: the final quality at every budget (median), the shortest budget
  reaching SGD's whole-budget quality of the same seed (median of the fractions, a seed
  where none does counting as "not reached"), its steps and training seconds and their
  ratios to SGD's whole budget; with ``summary`` (part 2's), the crossing ratios beside.
  """
  if 1 not in by_budget and 1.0 not in by_budget:
    raise ValueError("budget_summary needs the whole budget (1) among the fractions")
  whole = by_budget[1.0]
  out: dict[str, Any] = {}
  for i, first in enumerate(whole[0]):
    per_seed = []
    for s, whole_results in enumerate(whole):
      sgd = whole_results[0]
      reference = report.final_quality(sgd, target, window)
      quality = {
        b: report.final_quality(runs[s][i], target, window) for b, runs in by_budget.items()
      }
      budget = shortest_budget(quality, reference, target.higher_is_better)
      reached = None if budget is None else by_budget[budget][s][i]
      sgd_seconds = sgd.step_times[-1] if sgd.step_times else None
      seconds = reached.step_times[-1] if reached is not None else None
      per_seed.append(
        {
          "quality": quality,
          "reference": reference,
          "budget": budget,
          "steps": reached.steps if reached is not None else None,
          "seconds": seconds,
          "steps_ratio": reached.steps / sgd.steps if reached is not None else None,
          "time_ratio": (seconds / sgd_seconds if seconds is not None and sgd_seconds else None),
        }
      )
    row = {
      "key": first.key,
      "seeds": len(per_seed),
      "reached": sum(p["budget"] is not None for p in per_seed),
      "quality": {str(b): stats([p["quality"][b] for p in per_seed]) for b in sorted(by_budget)},
      "budget": stats([p["budget"] for p in per_seed]),
      "steps": stats([p["steps"] for p in per_seed]),
      "seconds": stats([p["seconds"] for p in per_seed]),
      "steps_ratio": stats([p["steps_ratio"] for p in per_seed]),
      "time_ratio": stats([p["time_ratio"] for p in per_seed]),
      "per_seed": per_seed,
    }
    if summary is not None and first.name in summary:
      row["crossing_steps_ratio"] = summary[first.name]["steps_ratio"]
      row["crossing_time_ratio"] = summary[first.name]["time_ratio"]
    out[first.name] = row
  return out


def budget_table(budgets: dict[str, Any], target: Target, window: int) -> str:
  """Part 3: final quality per budget, the shortest budget reaching SGD's whole-budget
  quality, and beside it part 2's crossing measure."""
  fractions = list(next(iter(budgets.values()))["quality"])
  what = report.quality_definition(target, window)
  head = (
    ["optimizer"]
    + [
      f"{what} at {float(b):.0%} of the budget" if i == 0 else f"at {float(b):.0%}"
      for i, b in enumerate(fractions)
    ]
    + [
      "shortest budget at SGD's whole-budget quality",
      "its steps / SGD's",
      "its time / SGD's",
      "reached",
      "crossing: steps / SGD's",
      "crossing: time / SGD's",
    ]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in budgets.items():
    lines.append(
      "| "
      + " | ".join(
        [name]
        + [spread(row["quality"][b], ".5g") for b in fractions]
        + [
          spread(row["budget"], ".0%"),
          spread(row["steps_ratio"], ".2f"),
          spread(row["time_ratio"], ".2f"),
          f"{row['reached']}/{row['seeds']}",
          spread(row.get("crossing_steps_ratio"), ".2f"),
          spread(row.get("crossing_time_ratio"), ".2f"),
        ]
      )
      + " |"
    )
  return "\n".join(lines) + "\n"


def write(
  outcome: Outcome,
  task: Task,
  protocol: Protocol,
  out: Path,
  *,
  title: str,
  epochs: int,
  window: int,
  tune_steps: int,
  settings: dict[str, Any],
) -> Path:
  """``protocol.md`` and ``protocol.json`` into ``out``, the per-seed reports below it."""
  out.mkdir(parents=True, exist_ok=True)
  target = task.target
  for seed, results in zip(protocol.seeds, outcome.runs):
    value = report.set_times_to_target(results, target, window)
    report.write_all(
      results,
      out / f"seed{seed}",
      f"{title}, seed {seed}",
      target,
      value,
      {**settings, "seed": seed},
      window=window,
      labels=task.metric_labels,
    )
  scored_by = validation_target(target)
  info = report.machine_info()
  md = [
    f"# {title}: the tuning protocol\n",
    f"Tuning on {protocol.validation_fraction:.0%} of the training set held out, "
    f"{protocol.tune_fraction:.0%} of the budget, seed {protocol.tune_seed}"
    + (
      f" (as recorded in `{settings['tuning_from']}`, not run again)"
      if settings.get("tuning_from")
      else ""
    )
    + "; then "
    f"{epochs} epoch{'s' * (epochs != 1)} ({epochs * task.steps_per_epoch} steps) on the "
    "whole training set, "
    f"seeds {', '.join(map(str, protocol.seeds))}, interleaved.\n",
    "## Tuning\n",
    tuning_tables(outcome.searches, scored_by, tune_steps),
    "## Full budget\n",
    f"Medians over seeds [min–max]. SGD's final quality: its "
    f"{report.quality_definition(target, window)} in the same seed.\n",
    final_table(outcome.summary, outcome.rows, target, window, outcome.sgd_value),
  ]
  if outcome.budgets:
    seeds = ", ".join(map(str, protocol.seeds_for_budgets))
    md += [
      "## Budget to quality\n",
      "A whole schedule over each fraction of the budget, the tuned values, seeds "
      f"{seeds}; medians over seeds [min–max]. The shortest budget is the smallest whose "
      "final quality reaches SGD's at the whole budget in the same seed; the crossing "
      "is the first step of the whole-budget run at that quality.\n",
      budget_table(outcome.budgets, target, window),
    ]
  md.append(
    f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    + ".\n"
  )
  (out / "protocol.md").write_text("\n".join(md))
  document = {
    "title": title,
    "protocol": asdict(protocol),
    "settings": settings,
    "machine": info,
    "target": {
      **asdict(target),
      "definition": report.quality_definition(target, window),
      "sgd_final": outcome.sgd_value,
    },
    "tuning": {
      s.spec.name: {
        "key": key,
        "grids": s.grids,
        "chosen": s.chosen(),
        "score": s.best.score,
        "scored_by": asdict(scored_by),
        "steps": tune_steps,
        "trials": [{"stage": t.stage, **asdict(t.point), "score": t.score} for t in s.trials],
      }
      for key, s in outcome.searches.items()
    },
    "rows": [
      {"name": r.name, "key": r.spec.key, "variant": r.variant, **asdict(r.point)}
      for r in outcome.rows
    ],
    "summary": outcome.summary,
    "budgets": outcome.budgets,
  }
  (out / "protocol.json").write_text(json.dumps(jsonable(document), indent=1) + "\n")
  return out / "protocol.md"
