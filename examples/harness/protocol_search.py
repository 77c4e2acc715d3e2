"""Part 1 of the tuning protocol (:mod:`examples.harness.protocol`): its settings
(:class:`Protocol`) and the search, each optimizer's learning rate on a log grid that grows
past an edge, then its damping and KL clip, scored on a held-out validation split
(:func:`tune`, :class:`Search`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax


from . import targets
from .optimizers import Options, Spec
from .training import RunConfig, Target, Task, Trainer, from_json, interleave


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
        search.record(p, targets.final_quality(r, scored_by))
    searches[spec.key] = search
  return searches
