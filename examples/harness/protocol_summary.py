"""The tuning protocol's statistics over seeds: medians and ranges (:func:`stats`,
:func:`spread`), ratios to a reference optimizer in the same seed (:func:`ratios_to`), the
final runs' summary (:func:`summarise`) and the budget to quality (:func:`budget_summary`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from . import targets
from .training import Result, Target


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
      value = targets.final_quality(ref, target, window)
      mine = targets.reach(results[i], target, value, window)
      own = targets.reach(ref, target, value, window)
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
      "final": stats([targets.final_quality(r, target, window) for r in per_seed]),
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
      reference = targets.final_quality(sgd, target, window)
      quality = {
        b: targets.final_quality(runs[s][i], target, window) for b, runs in by_budget.items()
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
