"""The examples' PNG plots: the target metric against epochs, steps and wall time, one curve per
optimizer (Eva's family drawn thick), smoothed where noisy (:func:`figures_of`, :func:`plot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .targets import format_value, quality_definition, trailing_mean

from .training import Result, Target


def is_eva_family(name: str) -> bool:
  """Whether ``name`` is one of Eva's family (Eva, Eva-f, Eva-s, Eva with KL
  normalisation, ...): the curves the plots draw thick and saturated."""
  return "eva" in name.lower()


def smooth(values: Sequence[float], span: int) -> np.ndarray:
  """The exponential moving average of ``values`` with span ``span`` (weight
  ``2 / (span + 1)`` on the newest value), bias-corrected so that it starts at the first
  value rather than at 0; non-finite values are carried over."""
  x = np.asarray(values, dtype=np.float64)
  out = np.empty_like(x)
  alpha = 2.0 / (max(1, span) + 1.0)
  avg = weight = 0.0
  for i, v in enumerate(x):
    if np.isfinite(v):
      avg = (1 - alpha) * avg + alpha * v
      weight = (1 - alpha) * weight + alpha
    out[i] = avg / weight if weight > 0 else v
  return out


def curve_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """One line style per run name, the same in every plot: Eva's family
  (:func:`is_eva_family`) in thick saturated colours drawn on top, the others thin, in
  light greyish colours, underneath. Every name gets its own colour."""
  import colorsys

  eva = [n for n in names if is_eva_family(n)]
  others = [n for n in names if not is_eva_family(n)]
  saturated = [
    "#d62728",
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#e377c2",
    "#17becf",
    "#8c564b",
  ]
  styles: dict[str, dict[str, Any]] = {}
  for i, n in enumerate(eva):
    colour = (
      saturated[i] if i < len(saturated) else colorsys.hls_to_rgb((i * 0.381966) % 1.0, 0.42, 0.9)
    )
    styles[n] = {"color": colour, "lw": 2.2, "alpha": 1.0, "zorder": 3}
  for i, n in enumerate(others):
    hue = (0.13 + i / max(1, len(others))) % 1.0  # the first (SGD) not Eva's red
    styles[n] = {
      "color": colorsys.hls_to_rgb(hue, 0.62, 0.22),
      "lw": 1.1,
      "alpha": 0.9,
      "zorder": 2,
    }
  return styles


def tail_limits(
  tails: Sequence[tuple[np.ndarray, np.ndarray]], target_value: float, higher_is_better: bool
) -> tuple[float, float] | None:
  """The y range of the last-half panel: from the best value any line reaches past half
  the budget to the worst final value (each line's last), SGD's final value included, with
  5 % of the range as margin; None when no value is finite. ``tails``: per line, (its
  values past half the budget, its last value)."""
  best = [v for values, _ in tails for v in values if np.isfinite(v)]
  last = [v for _, final in tails for v in final if np.isfinite(v)] + [target_value]
  if not best:
    return None
  extreme = max(best) if higher_is_better else min(best)
  worst = min(last) if higher_is_better else max(last)
  lo, hi = min(extreme, worst, target_value), max(extreme, worst, target_value)
  pad = 0.05 * (hi - lo) or 0.05 * abs(target_value) or 1.0
  return lo - pad, hi + pad


def draw_loss_curve(
  ax: Any,
  x: Sequence[float],
  raw: Sequence[float],
  style: dict[str, Any],
  *,
  smoothed: Sequence[float] | None = None,
  span: int = 10,
  **kw: Any,
) -> None:
  """The raw values of one run as a faint thin line, with the smoothed values over them
  in ``style`` (:func:`curve_styles`); ``smoothed`` defaults to :func:`smooth` of ``raw``
  with ``span``."""
  ax.plot(x, raw, color=style["color"], lw=0.5, alpha=0.12, zorder=1)
  ax.plot(x, smooth(raw, span) if smoothed is None else smoothed, **{**style, **kw})


def legend_outside(fig: Any, handles: Sequence[Any], **kw: Any) -> Any:
  """The figure's legend to the right of its axes, clear of the curves (the figure needs
  ``layout="constrained"``)."""
  kw.setdefault("fontsize", 7)
  return fig.legend(handles=list(handles), loc="outside right upper", **kw)


def plot(
  results: Sequence[Result],
  out: Path,
  title: str,
  target: Target | None = None,
  target_value: float | None = None,
  *,
  window: int = 10,
  labels: dict[str, str] | None = None,
  log_loss: bool = True,
) -> list[Path]:
  """``loss_vs_epoch.png`` and ``loss_vs_time.png``.

  ``loss_vs_epoch.png``: the training loss (each epoch's mean) and every test metric (at
  every evaluation) against epochs. ``loss_vs_time.png``: the target's metric against
  training wall time and against steps, with SGD's final value drawn as a line and each
  optimizer's first crossing marked; a training loss is drawn as the faint per-step losses
  under their mean over the last ``window`` steps (the target's reading; on runs longer
  than 100 ``window`` steps, under their exponential moving average over a hundredth of
  the longest run, :func:`smooth`); where SGD's final value is given, a third panel zooms
  on the last half of the steps (linear axis, :func:`tail_limits`). Eva's family is drawn
  thick and saturated, the other optimizers thin and muted (:func:`curve_styles`); line
  styles tell the splits apart (solid: train, dashed: test); the legend sits to the right
  of the axes; the y axes carry the metric's name from ``labels`` (e.g. ``{"loss": "MSE"}``).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figures = figures_of(
    results, title, target, target_value, window=window, labels=labels, log_loss=log_loss
  )
  paths = []
  for name, fig in zip(("loss_vs_epoch.png", "loss_vs_time.png"), figures):
    paths.append(out / name)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def figures_of(
  results: Sequence[Result],
  title: str,
  target: Target | None = None,
  target_value: float | None = None,
  *,
  window: int = 10,
  labels: dict[str, str] | None = None,
  log_loss: bool = True,
) -> tuple[Any, Any]:
  """The two figures of :func:`plot` (matplotlib ``Figure`` objects, not saved); each
  has one figure legend (``fig.legends[0]``)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  labels = labels or {}
  target = target or Target()
  styles = curve_styles([r.name for r in results])
  optimizer_handles = [Line2D([], [], label=r.name, **styles[r.name]) for r in results]

  def split_handles(train: str = "train") -> list[Any]:
    return [
      Line2D([], [], color="0.4", linestyle="-", label=train),
      Line2D([], [], color="0.4", linestyle="--", marker="o", ms=3, label="test"),
    ]

  test_keys = sorted({k for r in results for k in r.evals})
  panels = [("train", "loss")] + [("test", k) for k in test_keys]
  fig, axes = plt.subplots(
    1, len(panels), figsize=(4.6 * len(panels) + 2.2, 4), layout="constrained"
  )
  for ax, (split, key) in zip(np.atleast_1d(axes), panels):
    for r in results:
      if split == "train":
        values = r.train.get(key, [])
        ax.plot(
          np.arange(1, len(values) + 1), values, linestyle="-", marker="o", ms=3, **styles[r.name]
        )
      else:
        per_epoch = r.steps_per_epoch or max(r.steps, 1)
        ax.plot(
          np.asarray(r.eval_steps) / per_epoch,
          r.evals.get(key, []),
          linestyle="--",
          marker="o",
          ms=3,
          **styles[r.name],
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} {labels.get(key, key)}")
    ax.set_title(f"{split} {key}" + (" (each epoch's mean)" if split == "train" else ""))
    if log_loss and key == "loss":
      ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
  legend_outside(fig, optimizer_handles + split_handles())
  fig.suptitle(title)
  by_epoch = fig

  split, _, key = target.metric.partition("_")
  label = labels.get(key, key)
  # The training loss's line: the target's reading (the mean of the last ``window`` step
  # losses), or on long runs, where that is still noisy, an exponential moving average over
  # about a hundredth of the longest run.
  longest = max((len(r.step_losses) for r in results), default=0)
  span = max(window, longest // 100)
  # A third panel, where SGD's final value is known: the target's own split over the last
  # half of the steps, on a linear axis zoomed on the band from the best value reached there
  # to the worst final one (:func:`tail_limits`), where the curves that the first two
  # panels squeeze together part.
  views = ("time", "steps", "tail") if target_value is not None else ("time", "steps")
  fig = plt.figure(figsize=(7 * len(views), 4.6), layout="constrained")
  axes = [fig.add_subplot(1, len(views), 1)]
  axes += [fig.add_subplot(1, len(views), 2, sharey=axes[0])]
  axes += [fig.add_subplot(1, len(views), 3)] if len(views) == 3 else []
  half = max((r.steps for r in results), default=0) / 2
  lines = {  # each run's training-loss line, computed once for every panel
    r.name: trailing_mean(r.step_losses, window) if span == window else smooth(r.step_losses, span)
    for r in results
    if key == "loss" and r.step_losses
  }
  tails: list[tuple[np.ndarray, np.ndarray]] = []  # per line: its values past half, its last
  for ax, by in zip(axes, views):
    for r in results:
      style = styles[r.name]
      if r.name in lines:  # the training loss, as the target reads it
        line = np.asarray(lines[r.name])
        x = np.asarray(r.step_times) if by == "time" else np.arange(1, len(line) + 1)
        if by != "tail":
          draw_loss_curve(ax, x, r.step_losses, style, smoothed=line, linestyle="-")
        elif split == "train":  # the tail shows the target's own split only
          ax.plot(x[x >= half], line[x >= half], linestyle="-", **style)
          tails.append((line[x >= half], line[-1:]))
      if key in r.evals and (by != "tail" or split == "test"):
        x = np.asarray(r.eval_times if by == "time" else r.eval_steps)
        values = np.asarray(r.evals[key], dtype=np.float64)
        if by == "tail":
          x, values = x[x >= half], values[x >= half]
          tails.append((values, values[-1:]))
        ax.plot(x, values, linestyle="--", marker="o", ms=3, **style)
      if target_value is not None and r.steps_to_target is not None:
        x = r.time_to_target if by == "time" else r.steps_to_target
        ax.plot([x], [target_value], color=style["color"], marker="x", ms=10, mew=2.5, zorder=4)
    if target_value is not None:
      ax.axhline(target_value, color="k", linestyle=":", lw=1)
    ax.set_xlabel("training wall time (s)" if by == "time" else "steps")
    ax.set_ylabel(label)
    if log_loss and key == "loss" and by != "tail":
      ax.set_yscale("log")
    if by == "tail" and target_value is not None:
      ax.set_xlim(half, None)
      limits = tail_limits(tails, target_value, target.higher_is_better)
      if limits is not None:
        ax.set_ylim(*limits)
    ax.grid(True, alpha=0.3)
  what = quality_definition(target, window)
  extra = [
    Line2D(
      [],
      [],
      color="k",
      linestyle=":",
      label=f"SGD's final {what}"
      + (f" = {format_value(target_value)}" if target_value is not None else ""),
    ),
    Line2D([], [], color="0.4", marker="x", linestyle="", ms=8, mew=2, label="first reached"),
  ]
  splits = split_handles(
    f"train (mean of the last {window} steps)"
    if span == window
    else f"train (moving average, span {span} steps)"
  )
  splits = splits if key == "loss" else splits[1:]
  raw = (
    [Line2D([], [], color="0.4", lw=0.6, alpha=0.3, label="train (each step)")]
    if key == "loss"
    else []
  )
  legend_outside(fig, optimizer_handles + splits + raw + extra)
  axes[0].set_title(f"{label} vs wall time")
  axes[1].set_title(f"{label} vs steps")
  if len(axes) == 3:
    axes[2].set_title("the last half of the steps, near SGD's final value")
  fig.suptitle(title)
  return by_epoch, fig
