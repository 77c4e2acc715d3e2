"""Hyperparameter sweep of one optimizer against SGD: steps and seconds to SGD's quality.

Runs an example (``examples/<workload>.py``) once with SGD, then once per point of the grid
``--lr × --damping × --kl-clip`` with ``--optimizer``, from the same initial parameters on
the same batches, and reports for every point the final quality and how long the optimizer
takes to reach SGD's final quality (the example's target: SGD's final training loss for the
autoencoder, its test accuracy for the classifier, its test loss for the language model),
both in steps (which does not depend on the load of the machine) and in training seconds,
with the ratios to SGD's own steps and seconds.

Outputs: a markdown table on stdout and ``sweep.md`` / ``sweep.json`` in ``--out``.

Usage::

    python -m benchmarks.sweep --workload autoencoder --optimizer eva \\
        --lr 0.03,0.06,0.1 --damping 0.01,0.03,0.1 --kl-clip 0.0003,0.001,0.003 -- --epochs 3
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.convergence import WORKLOADS, load_example
from examples.harness import report, targets
from examples.harness.records import dumps
from examples.harness.training import Result

ROOT = Path(__file__).resolve().parent


def _floats(text: str | None, flag: str) -> list[float | None]:
  if text is None:
    return [None]
  try:
    return [float(v) for v in text.split(",")]
  except ValueError:
    raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--workload", default="autoencoder", choices=sorted(WORKLOADS))
  p.add_argument("--optimizer", default="eva")
  p.add_argument("--lr", default=None, help="comma-separated learning rates")
  p.add_argument("--damping", default=None, help="comma-separated dampings")
  p.add_argument("--kl-clip", default=None, help="comma-separated KL clips")
  p.add_argument("--out", default=str(ROOT / "results" / "sweep"))
  p.add_argument("extra", nargs="*", help="flags for the example (after --)")
  args = p.parse_args(argv)
  example = load_example(args.workload)
  out = Path(args.out)
  common = list(args.extra) + ["--no-checkpoint"]
  task_window = 10

  sgd = example.main(common + ["--optimizers", "sgd", "--out", str(out / "sgd")])[0]
  grid = list(
    itertools.product(
      _floats(args.lr, "--lr"),
      _floats(args.damping, "--damping"),
      _floats(args.kl_clip, "--kl-clip"),
    )
  )
  points: list[tuple[dict[str, Any], Result]] = []
  for i, (lr, damping, kl_clip) in enumerate(grid):
    flags = common + ["--optimizers", args.optimizer, "--out", str(out / f"point{i}")]
    setting = {"lr": lr, "damping": damping, "kl_clip": kl_clip}
    for name, value in setting.items():
      if value is not None:
        flags += [f"--{name.replace('_', '-')}", str(value)]
    points.append((setting, example.main(flags)[0]))

  target = example.make_task(example.parse_args(common)).target
  value = targets.set_times_to_target([sgd] + [r for _, r in points], target, task_window)
  sgd_steps = sgd.steps_to_target
  rows = []
  for setting, r in points:
    steps = r.steps_to_target
    rows.append(
      {
        **setting,
        "lr_used": r.lr,
        "final": r.final(target.metric),
        "diverged": r.diverged,
        "time_to_target_s": r.time_to_target,
        "time_ratio": (
          r.time_to_target / sgd.time_to_target if r.time_to_target and sgd.time_to_target else None
        ),
        "steps_to_target": steps,
        "steps_ratio": steps / sgd_steps if steps and sgd_steps else None,
      }
    )
  f = lambda v, fmt: "–" if v is None else format(v, fmt)
  lines = [
    f"Sweep of {args.optimizer} on {args.workload} (flags: {' '.join(args.extra)}); "
    f"target: SGD's final {target.metric} = {f(value, '.5g')}, reached by SGD at step "
    f"{f(sgd_steps, 'd')} / {f(sgd.time_to_target, '.1f')} s.\n",
    f"| lr | damping | kl_clip | final {target.metric} | steps to target | × SGD steps "
    "| seconds to target | × SGD time |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    lines.append(
      f"| {row['lr_used']:g} | {f(row['damping'], 'g')} | {f(row['kl_clip'], 'g')} "
      f"| {'diverged' if row['diverged'] else f(row['final'], '.5g')} "
      f"| {f(row['steps_to_target'], 'd')} | {f(row['steps_ratio'], '.2f')} "
      f"| {f(row['time_to_target_s'], '.1f')} | {f(row['time_ratio'], '.2f')} |"
    )
  md = "\n".join(lines) + "\n"
  out.mkdir(parents=True, exist_ok=True)
  (out / "sweep.md").write_text(md)
  (out / "sweep.json").write_text(
    dumps(
      {
        "workload": args.workload,
        "optimizer": args.optimizer,
        "flags": args.extra,
        "target": target.metric,
        "sgd_value": value,
        "sgd_steps": sgd_steps,
        "sgd_time_s": sgd.time_to_target,
        "points": rows,
        "machine": report.machine_info(),
      }
    )
  )
  print("\n" + md)
  return rows


if __name__ == "__main__":
  main()
