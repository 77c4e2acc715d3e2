"""What the examples write: markdown table, ``metrics.json``, ``metrics.csv``, PNG plots.

"Time to target" is the training wall time, and "steps to target" the number of steps, at
which an optimizer first reaches SGD's final value of the task's target metric
(:class:`examples.harness.training.Target`): for ``train_loss``, the first step at which
the mean of the last ``window`` step losses is at or below it; for a test metric, the first
evaluation (every ``--eval-every`` steps and at the end of every epoch) at which it is
reached. Steps do not depend on the load of the machine; seconds do.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .training import Result, Target, jsonable


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


def _fmt(v: float, digits: int = 5) -> str:
  return f"{v:.{digits}g}" if math.isfinite(v) else str(v)


def markdown_table(
  results: Sequence[Result], target: Target, target_value: float | None, window: int = 10
) -> str:
  """One row per optimizer: lr, final quality, final train/test metrics, s/epoch, steps
  and time to SGD's final quality with their ratios to SGD's, state.

  SGD's final quality has one definition (:func:`final_quality`), written into the
  header with its value; the rows give every optimizer's value of the same quantity.
  """
  train_keys = sorted({k for r in results for k in r.train})
  test_keys = sorted({k for r in results for k in r.test})
  tv = _fmt(target_value) if target_value is not None else "n/a"
  what = quality_definition(target, window)
  by_loss = target.metric == "train_loss"  # else the target is one of the test columns
  header = (
    ["optimizer", "lr"]
    + ([f"final {what}"] if by_loss else [])
    + [f"train {k} (last epoch's mean)" for k in train_keys]
    + [f"final test {k}" for k in test_keys]
    + [
      "s/epoch",
      f"steps to SGD's final {what} = {tv}",
      "× SGD's steps",
      "time to it",
      "× SGD's time",
      "optimizer state",
    ]
  )
  sgd = next((r for r in results if r.key == "sgd"), None)
  sgd_steps = sgd.steps_to_target if sgd is not None else None
  sgd_time = sgd.time_to_target if sgd is not None else None
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in results:
    reach_steps = reach_time = "diverged" if r.diverged else "not reached"
    step_ratio = time_ratio = ""
    if r.time_to_target is not None and r.steps_to_target is not None:
      reach_steps, reach_time = f"{r.steps_to_target}", f"{r.time_to_target:.1f} s"
      if sgd_steps:
        step_ratio = f"{r.steps_to_target / sgd_steps:.2f}"
      if sgd_time:
        time_ratio = f"{r.time_to_target / sgd_time:.2f}"
    row = (
      [r.name, f"{r.lr:g}"]
      + ([_fmt(final_quality(r, target, window))] if by_loss else [])
      + [_fmt(r.final(f"train_{k}")) for k in train_keys]
      + [_fmt(r.final(f"test_{k}")) for k in test_keys]
      + [
        f"{r.seconds_per_epoch:.1f}",
        reach_steps,
        step_ratio,
        reach_time,
        time_ratio,
        f"{r.state_bytes / 2**20:.1f} MiB",
      ]
    )
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def summary_table(
  results: Sequence[Result],
  target: Target,
  target_value: float | None,
  window: int = 10,
  details: str | None = None,
) -> str:
  """The terminal's summary: six short columns (optimizer, lr, final quality, steps to
  SGD's final quality, their ratio to SGD's, seconds to it), aligned, with the columns'
  definitions below; ``details`` names the file with every column
  (:func:`markdown_table`)."""
  sgd = next((r for r in results if r.key == "sgd"), None)
  sgd_steps = sgd.steps_to_target if sgd is not None else None
  head = ["optimizer", "lr", "final", "steps", "× SGD", "time"]
  rows = []
  for r in results:
    steps = ratio = time = "diverged" if r.diverged else "–"
    if r.steps_to_target is not None and r.time_to_target is not None:
      steps, time = f"{r.steps_to_target}", f"{r.time_to_target:.1f} s"
      ratio = f"{r.steps_to_target / sgd_steps:.2f}" if sgd_steps else "–"
    rows.append([r.name, f"{r.lr:g}", _fmt(final_quality(r, target, window)), steps, ratio, time])
  widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
  line = lambda row: "  ".join(
    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
  )
  what = quality_definition(target, window)
  tv = _fmt(target_value) if target_value is not None else "n/a"
  notes = [
    f"final  {what} at the end",
    f"steps  steps until that quantity first reaches SGD's final value, {tv} (–: never)",
    "× SGD  those steps / SGD's steps (below 1: fewer than SGD)",
    "time   training wall time to that point",
  ]
  if details:
    notes.append(f"every column (test metrics, s/epoch, optimizer state): {details}")
  return (
    "\n".join(
      [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] + [""] + notes
    )
    + "\n"
  )


def write_csv(results: Sequence[Result], path: Path) -> None:
  """One row per optimizer and epoch: train and test metrics, epoch and total seconds."""
  train_keys = sorted({k for r in results for k in r.train})
  test_keys = sorted({k for r in results for k in r.test})
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      ["optimizer", "lr", "epoch"]
      + [f"train_{k}" for k in train_keys]
      + [f"test_{k}" for k in test_keys]
      + ["epoch_seconds", "train_seconds"]
    )
    for r in results:
      total = 0.0
      for e, seconds in enumerate(r.epoch_times):
        total += seconds
        get = lambda d, k: d.get(k, [])[e] if e < len(d.get(k, [])) else ""
        w.writerow(
          [r.name, r.lr, e + 1]
          + [get(r.train, k) for k in train_keys]
          + [get(r.test, k) for k in test_keys]
          + [f"{seconds:.4f}", f"{total:.4f}"]
        )


def machine_info(devices: bool = True) -> dict[str, Any]:
  """Processor, accelerator and library versions, for every results file.

  ``cpu`` (model name), ``cpu_count`` and ``usable_cpus`` (this process's affinity),
  ``platform``, ``machine``, ``python``, ``xla_flags`` and ``versions``; with ``devices``
  also ``jax_backend``, ``devices`` (every device), ``device_count``, ``device_kind``
  and ``device`` (``platform (kind)`` of the first). ``devices=False`` leaves JAX's
  backend uninitialised (a driver whose workers own the devices).
  """
  import flax
  import jax
  import jaxlib
  import optax

  import eva_optax

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    usable = os.cpu_count()
  info: dict[str, Any] = {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "usable_cpus": usable,
    "platform": platform.platform(),
    "machine": platform.machine(),
    "python": sys.version.split()[0],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  if devices:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    info.update(
      {
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_count": jax.device_count(),
        "device_kind": kind,
        "device": f"{device.platform} ({kind})",
      }
    )
  info["versions"] = {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "eva_optax": eva_optax.__version__,
    "numpy": np.__version__,
  }
  return info


def trailing_mean(losses: Sequence[float], window: int) -> np.ndarray:
  """The mean of the last ``window`` values at every step (fewer at the start): the
  training loss as the target reads it."""
  x = np.asarray(losses, dtype=np.float64)
  csum = np.concatenate([[0.0], np.cumsum(x)])
  i = np.arange(1, len(x) + 1)
  start = np.maximum(0, i - window)
  return (csum[i] - csum[start]) / (i - start)


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
  the longest run, :func:`smooth`). Eva's family is drawn thick and saturated, the other
  optimizers thin and muted (:func:`curve_styles`); line styles tell the splits apart
  (solid: train, dashed: test); the legend sits to the right of the axes; the y axes carry
  the metric's name from ``labels`` (e.g. ``{"loss": "MSE"}``).
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
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), sharey=True, layout="constrained")
  for ax, by in zip(axes, ("time", "steps")):
    for r in results:
      style = styles[r.name]
      if key == "loss" and r.step_losses:  # the training loss, as the target reads it
        x = r.step_times if by == "time" else np.arange(1, len(r.step_losses) + 1)
        line = (
          trailing_mean(r.step_losses, window) if span == window else smooth(r.step_losses, span)
        )
        draw_loss_curve(ax, x, r.step_losses, style, smoothed=line, linestyle="-")
      if key in r.evals:
        ax.plot(
          r.eval_times if by == "time" else r.eval_steps,
          r.evals[key],
          linestyle="--",
          marker="o",
          ms=3,
          **style,
        )
      if target_value is not None and r.steps_to_target is not None:
        x = r.time_to_target if by == "time" else r.steps_to_target
        ax.plot([x], [target_value], color=style["color"], marker="x", ms=10, mew=2.5, zorder=4)
    if target_value is not None:
      ax.axhline(target_value, color="k", linestyle=":", lw=1)
    ax.set_xlabel("training wall time (s)" if by == "time" else "steps")
    ax.set_ylabel(label)
    if log_loss and key == "loss":
      ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
  what = quality_definition(target, window)
  extra = [
    Line2D(
      [],
      [],
      color="k",
      linestyle=":",
      label=f"SGD's final {what}"
      + (f" = {_fmt(target_value)}" if target_value is not None else ""),
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
  fig.suptitle(title)
  return by_epoch, fig


def write_all(
  results: Sequence[Result],
  out: Path,
  title: str,
  target: Target,
  target_value: float | None,
  config: dict[str, Any],
  *,
  window: int = 10,
  labels: dict[str, str] | None = None,
) -> tuple[str, list[Path]]:
  """Write ``results.md``, ``metrics.json``, ``metrics.csv`` and the plots into ``out``
  (``window``: the target's, for a training-loss target; ``labels``: the metrics' names
  for the y axes)."""
  out.mkdir(parents=True, exist_ok=True)
  table = markdown_table(results, target, target_value, window)
  info = machine_info()
  md = (
    f"# {title}\n\n{table}\n"
    f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    + ".\n"
  )
  (out / "results.md").write_text(md)
  metrics = {
    "title": title,
    "config": config,
    "machine": info,
    "target": {
      **asdict(target),
      "sgd_final_value": target_value,
      "definition": quality_definition(target, window),
    },
    "optimizers": {r.name: asdict(r) for r in results},
  }
  (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1) + "\n")
  write_csv(results, out / "metrics.csv")
  paths = [out / "results.md", out / "metrics.json", out / "metrics.csv"]
  paths += plot(results, out, title, target, target_value, window=window, labels=labels)
  return table, paths
