"""Quality and time to target: a run's final quality as its :class:`Target` reads it (the mean
of the last ``window`` step losses for ``train_loss``, else the last evaluation), and the
steps and training seconds at which a run first reaches SGD's final value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .training import Result, Target


def _better(target: Target, value: float) -> Any:
  return (lambda v: v >= value) if target.higher_is_better else (lambda v: v <= value)


def reach(
  result: Result, target: Target, value: float, window: int = 10
) -> tuple[int, float] | None:
  """``(steps, training seconds)`` at which ``result`` first reaches ``value`` of
  ``target.metric`` (None: never)."""
  if not math.isfinite(value):
    return None
  if target.metric == "train_loss":
    steps = steps_to_reach(result, value, window)
    return None if steps is None else (steps, result.step_times[steps - 1])
  split, _, name = target.metric.partition("_")
  if split != "test":
    raise ValueError(f"target {target.metric!r}: only train_loss or test_<metric>")
  better = _better(target, value)
  for steps, seconds, v in zip(result.eval_steps, result.eval_times, result.evals.get(name, [])):
    if math.isfinite(v) and better(v):
      return steps, seconds
  return None


def time_to_reach(result: Result, target: Target, value: float, window: int = 10) -> float | None:
  """Training seconds until ``result`` reaches ``value`` of ``target.metric`` (None: never)."""
  reached = reach(result, target, value, window)
  return None if reached is None else reached[1]


def steps_to_reach(result: Result, value: float, window: int = 10) -> int | None:
  """Steps until the mean of the last ``window`` step losses is at or below ``value``.

  Each mean is taken as :func:`final_quality` takes the last one (``np.mean`` of the
  window), so a run always reaches its own final quality, at its last step at the latest.
  """
  losses = np.asarray(result.step_losses, dtype=np.float64)
  if len(losses) == 0 or not math.isfinite(value):
    return None
  window = max(1, min(window, len(losses)))
  for i in range(window, len(losses) + 1):
    mean = np.mean(losses[i - window : i])
    if np.isfinite(mean) and mean <= value:
      return i
  return None


def quality_definition(target: Target, window: int = 10) -> str:
  """The words for :func:`final_quality` of ``target``, as the tables print them."""
  if target.metric == "train_loss":
    return f"train loss (mean of the last {window} step losses)"
  return f"{target.metric.replace('_', ' ')} (last evaluation)"


def final_quality(result: Result, target: Target, window: int = 10) -> float:
  """``result``'s final value of ``target.metric``, as the target is read: the mean of the
  last ``window`` step losses for ``train_loss``, else the last evaluation (NaN: none)."""
  if result.diverged:
    return float("nan")
  if target.metric == "train_loss":
    losses = result.step_losses[-max(1, min(window, len(result.step_losses))) :]
    return float(np.mean(losses)) if losses else float("nan")
  name = target.metric.partition("_")[2]
  values = result.evals.get(name) or result.test.get(name) or []
  return float(values[-1]) if values else float("nan")


def set_times_to_target(results: Sequence[Result], target: Target, window: int) -> float | None:
  """Fill every ``time_to_target`` and ``steps_to_target`` from SGD's final value
  (:func:`final_quality`); returns that value (or None: no SGD, or it diverged)."""
  sgd = next((r for r in results if r.key == "sgd"), None)
  if sgd is None or sgd.diverged:
    return None
  value = final_quality(sgd, target, window)
  for r in results:
    reached = reach(r, target, value, window)
    r.steps_to_target, r.time_to_target = reached if reached else (None, None)
  return value


def format_value(v: float, digits: int = 5) -> str:
  """``v`` as the tables and plots print it: ``digits`` significant digits (nan, inf as such)."""
  return f"{v:.{digits}g}" if math.isfinite(v) else str(v)


def trailing_mean(losses: Sequence[float], window: int) -> np.ndarray:
  """The mean of the last ``window`` values at every step (fewer at the start): the
  training loss as the target reads it."""
  x = np.asarray(losses, dtype=np.float64)
  csum = np.concatenate([[0.0], np.cumsum(x)])
  i = np.arange(1, len(x) + 1)
  start = np.maximum(0, i - window)
  return (csum[i] - csum[start]) / (i - start)
