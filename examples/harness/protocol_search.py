"""Part 1 of the tuning protocol (:mod:`examples.harness.protocol`): its settings
(:class:`Protocol`) and the search, each optimizer's learning rate on a log grid that grows
past an edge, then its damping and KL clip, scored on a held-out validation split
(:func:`tune`, :class:`Search`); after each grid, its ``confirm_top`` best points run
again over the whole budget and the winner is chosen there (the confirmation).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import jax


from . import targets
from .optimizers import Options, Spec
from .records import from_json
from .training import RunConfig, Target, Task, Trainer, interleave


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
  # After each grid (lr, damping, KL clip), its best points by the short-budget score rerun
  # over the whole budget (validation split, tune_seed); the best there is chosen. 0: off.
  confirm_top: int = 2

  def __post_init__(self) -> None:
    if self.confirm_top < 0:
      raise ValueError(f"confirm_top must be at least 0, got {self.confirm_top}")
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
    if not self.budgets or self.budgets[-1] != 1:
      raise ValueError(
        f"budgets must end with the whole budget 1, the reference the shorter ones are "
        f"measured against (its runs are the final runs: --resume reads finished ones "
        f"back), got {self.budgets}"
      )
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


class RecordMismatch(ValueError):
  """A recorded tuning that cannot stand for this protocol's (:func:`recorded_tuning`)."""


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


STAGES = ("lr", "damping", "kl_clip")


@dataclass
class Trial:
  stage: str  # "lr" | "damping" | "kl_clip"
  point: Point
  score: float
  steps: int | None = None  # the run's steps (None: not given)
  # A rerun over the whole budget of one of the stage's best (the confirmation).
  confirmation: bool = False


@dataclass
class StageChoice:
  """One stage's outcome (:meth:`Search.stage_choice`)."""

  short_best: Trial  # the best by the short-budget score (the previous choice included)
  top: list[Trial]  # the short trials to confirm, best first
  confirmed: list[Trial | None]  # their whole-budget trials (None: not run yet)
  chosen: Trial | None  # None while confirmations are pending


class Search:
  """The tuning of one optimizer, stage by stage: :meth:`pending` gives the points to run
  now (over the whole budget while :attr:`confirming`, else over the short one),
  :meth:`record` takes their scores; empty ``pending()``: done, see :attr:`best`.

  A stage's candidates are the choice so far (its short-budget trial) and the stage's own
  trials. Ranked by their short-budget score (a diverged run last, of equal ones the first
  tried first), the best ``confirm_top`` finite ones run again over the whole budget (a
  point already run so, the choice so far, is not run twice) and the best of those
  whole-budget scores is the stage's choice; with ``confirm_top`` 0, the short-budget best.
  """

  def __init__(
    self, spec: Spec, center_lr: float, protocol: Protocol, higher_is_better: bool
  ) -> None:
    self.spec, self.protocol, self.higher_is_better = spec, protocol, higher_is_better
    self.confirm_top = protocol.confirm_top
    self.trials: list[Trial] = []
    self.center_lr = center_lr
    self.grids: dict[str, list[float]] = {
      "lr": lr_grid(center_lr, protocol.lr_points, protocol.lr_step)
    }
    self.stage = "lr"
    self.confirming = False
    self._queue = [Point(lr) for lr in self.grids["lr"]]
    self._extensions = 0

  @classmethod
  def recorded(
    cls, spec: Spec, record: dict[str, Any], protocol: Protocol, higher_is_better: bool
  ) -> Search:
    """The finished search that ``record`` (an entry of ``protocol.json``'s
    ``tuning``) describes: its grids, its trials in order, nothing pending. A record
    without ``confirm_top`` (written before the confirmation stage) had none. Raises
    RecordMismatch when the record's chosen values are not those of its choice."""
    search = cls(spec, record["grids"]["lr"][0], protocol, higher_is_better)
    search.confirm_top = int(record.get("confirm_top", 0))
    search.grids = {k: list(v) for k, v in record["grids"].items()}
    search.trials = [
      Trial(
        t["stage"],
        Point(t["lr"], t["damping"], t["kl_clip"], tuple(tuple(e) for e in t.get("extra", ()))),
        float(from_json(t["score"])),
        t.get("steps", record.get("steps")),
        bool(t.get("confirmation", False)),
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

  def _first(self, point: Point, confirmation: bool) -> Trial | None:
    return next(
      (t for t in self.trials if t.point == point and t.confirmation == confirmation), None
    )

  def stage_choice(self, stage: str, before: Trial | None) -> StageChoice | None:
    """``stage``'s candidates ranked and confirmed, ``before`` the choice of the stages
    before it (None: there is none); None when the stage has no trial."""
    own = [t for t in self.trials if t.stage == stage and not t.confirmation]
    if not own:
      return None
    previous = [] if before is None else [self._first(before.point, confirmation=False)]
    ranked = sorted(previous + own, key=lambda t: -self._key(t))  # stable: first tried first
    top = [t for t in ranked if math.isfinite(t.score)][: self.confirm_top]
    confirmed = [self._first(t.point, confirmation=True) for t in top]
    if not top:
      return StageChoice(ranked[0], [], [], ranked[0])
    if any(c is None for c in confirmed):
      return StageChoice(ranked[0], top, confirmed, None)
    chosen = confirmed[0]
    for c in confirmed[1:]:
      if self._key(c) > self._key(chosen):
        chosen = c
    return StageChoice(ranked[0], top, confirmed, chosen)

  def choices(self) -> dict[str, StageChoice]:
    """Every stage with trials, in order, up to the first still open."""
    out, before = {}, None
    for stage in STAGES:
      choice = self.stage_choice(stage, before)
      if choice is None:
        continue
      out[stage] = choice
      if choice.chosen is None:
        break
      before = choice.chosen
    return out

  @property
  def best(self) -> Trial:
    """The choice so far: the last finished stage's chosen trial (its whole-budget one when
    confirmed), or, in a stage still open, its best short-budget trial."""
    if not self.trials:
      raise ValueError(f"{self.spec.name}: no trial scored yet")
    last = list(self.choices().values())[-1]
    return last.chosen or last.short_best

  def record(self, point: Point, score: float, steps: int | None = None) -> None:
    self._queue.remove(point)  # ValueError for a point that is not pending
    self.trials.append(Trial(self.stage, point, float(score), steps, self.confirming))
    if not self._queue:
      self._next()

  def _grid(self, stage: str) -> list[Point]:
    """The points of ``stage`` around the choice so far (none: the stage does not apply)."""
    default = default_of(self.spec, stage)
    if default is None or (stage == "kl_clip" and self.spec.key not in self.protocol.kl_clip_for):
      return []
    factors = self.protocol.damping_factors if stage == "damping" else self.protocol.kl_clip_factors
    self.grids[stage] = scaled(default, factors)
    return [replace(self.best.point, **{stage: v}) for v in self.grids[stage] if v != default]

  def _next(self) -> None:
    if self.stage == "lr" and not self.confirming:
      best = self.best.point.lr
      lrs = self.grids["lr"]
      if self._extensions < self.protocol.max_extensions and best in (min(lrs), max(lrs)):
        beyond = lr_beyond(self.center_lr, lrs, self.protocol.lr_step, upwards=best == max(lrs))
        self._extensions += 1
        self.grids["lr"] = sorted(lrs + [beyond])
        self._queue = [Point(beyond)]
        return
    while self.stage != "done":
      if not self.confirming:
        self.confirming = True
        choice = self.choices().get(self.stage)
        if choice is not None and choice.chosen is None:
          self._queue = [t.point for t, c in zip(choice.top, choice.confirmed) if c is None]
          return
      self.confirming = False
      self.stage = STAGES[STAGES.index(self.stage) + 1] if self.stage != STAGES[-1] else "done"
      if self.stage != "done":
        self._queue = self._grid(self.stage)
        if self._queue:
          return

  def chosen(self) -> dict[str, float | None]:
    """The chosen values, defaults spelled out (None: the optimizer has no such knob)."""
    p = self.best.point
    return {
      "lr": p.lr,
      "damping": p.damping if p.damping is not None else default_of(self.spec, "damping"),
      "kl_clip": p.kl_clip if p.kl_clip is not None else default_of(self.spec, "kl_clip"),
    }

  def confirmations(self) -> dict[str, dict[str, Any]]:
    """Per confirmed stage: each confirmed point's short and whole-budget scores and steps,
    the short-budget choice, the confirmed one and whether it changed (``{}``: none)."""
    out = {}
    for stage, c in self.choices().items():
      if not c.top or c.chosen is None:
        continue
      out[stage] = {
        "points": [
          {
            **asdict(t.point),
            "short_score": t.score,
            "score": w.score,
            "steps": w.steps,
            "run_in": w.stage,  # another stage's: the choice so far, not run twice
          }
          for t, w in zip(c.top, c.confirmed)
        ],
        "short_choice": asdict(c.short_best.point),
        "chosen": asdict(c.chosen.point),
        "changed": c.chosen.point != c.short_best.point,
      }
    return out

  def runs(self) -> dict[str, int]:
    """The tuning runs' count and steps, the confirmation's among them."""
    confirming = [t for t in self.trials if t.confirmation]
    return {
      "count": len(self.trials),
      "steps": sum(t.steps or 0 for t in self.trials),
      "confirmation_count": len(confirming),
      "confirmation_steps": sum(t.steps or 0 for t in confirming),
    }


def centre_key(spec: Spec, default_lrs: dict[str, float]) -> str:
  """The optimizer whose rate in ``default_lrs`` centres ``spec``'s grid: its own, or for a
  chain ``"<x>+<tail>"`` (e.g. ``eva-f+adamw``) without one, the tail's, which owns the
  learning rate."""
  if spec.key in default_lrs or "+" not in spec.key:
    return spec.key
  return spec.key.rpartition("+")[2]


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
  if config.steps == budget_steps:  # the short budget is the whole one: nothing to confirm
    protocol = replace(protocol, confirm_top=0)
  searches = {}
  confirm = RunConfig(epochs=1, seed=protocol.tune_seed, steps=budget_steps)
  for spec in specs:
    key = centre_key(spec, task.default_lrs)
    if key not in task.default_lrs:
      raise SystemExit(f"{task.name}: no learning rate of {spec.key} to centre its grid on")
    search = Search(spec, task.default_lrs[key], protocol, scored_by.higher_is_better)
    while points := search.pending():
      run_config = confirm if search.confirming else config
      what = (
        f"{search.stage}, confirmed over the whole budget" if search.confirming else search.stage
      )
      print(f"--- tuning {spec.name}, {what}: " + "; ".join(p.label() for p in points))
      trainers = [
        Trainer(
          task,
          spec,
          p.lr,
          p.options(base),
          params,
          model_state,
          run_config,
          name=f"{spec.name} {p.label()}",
        )
        for p in points
      ]
      for p, r in zip(points, interleave(trainers, chunk)):
        search.record(p, targets.final_quality(r, scored_by), run_config.steps)
    searches[spec.key] = search
  return searches
