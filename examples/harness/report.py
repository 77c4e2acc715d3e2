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
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .curvature import curvature_table
from .plots import plot
from .targets import final_quality, format_value, quality_definition

from .records import dumps
from .training import Result, Target


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
  tv = format_value(target_value) if target_value is not None else "n/a"
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
      + ([format_value(final_quality(r, target, window))] if by_loss else [])
      + [format_value(r.final(f"train_{k}")) for k in train_keys]
      + [format_value(r.final(f"test_{k}")) for k in test_keys]
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
    rows.append(
      [r.name, f"{r.lr:g}", format_value(final_quality(r, target, window)), steps, ratio, time]
    )
  widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
  line = lambda row: "  ".join(
    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
  )
  what = quality_definition(target, window)
  tv = format_value(target_value) if target_value is not None else "n/a"
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
  """Write ``results.md``, ``metrics.json``, ``metrics.csv``, the plots and, where an
  optimizer of Eva's family ran, ``curvature.md`` (:func:`curvature_table`) into ``out``
  (``window``: the target's, for a training-loss target; ``labels``: the metrics' names
  for the y axes)."""
  out.mkdir(parents=True, exist_ok=True)
  table = markdown_table(results, target, target_value, window)
  info = machine_info()
  curvature = curvature_table(results)
  md = (
    f"# {title}\n\n{table}\n"
    + ("Does the curvature act (Eva's family)? See curvature.md.\n\n" if curvature else "")
    + f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    + ".\n"
  )
  (out / "results.md").write_text(md)
  if curvature:
    (out / "curvature.md").write_text(f"# {title}: does the curvature act?\n\n{curvature}")
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
  (out / "metrics.json").write_text(dumps(metrics))
  write_csv(results, out / "metrics.csv")
  paths = [out / "results.md", out / "metrics.json", out / "metrics.csv"]
  paths += [out / "curvature.md"] if curvature else []
  paths += plot(results, out, title, target, target_value, window=window, labels=labels)
  return table, paths
