"""Convergence in wall-clock time: the examples trained to SGD's quality, several seeds.

For each workload, every optimizer trains from the same initial parameters on the same
batches (the example scripts of ``examples/``, run in this process with checkpoints off),
once per seed. Per run the example measures the training wall time each optimizer needs to
reach SGD's final quality (``time to target``): SGD's final training loss for the
autoencoder (the trailing mean of its last 10 step losses), SGD's final test accuracy for
the classifier, SGD's final test loss for the language model. This script reports, per
optimizer, the median over seeds of:

- the final quality (train loss, test loss, test accuracy where there is one);
- the time to SGD's quality, and its ratio to SGD's own time (SGD's ratio is 1 by
  definition: it reaches its own final value at its end, or a little before);
- the seconds per epoch.

and the paper's headline comparisons: Eva's time to the target over SGD's, K-FAC's and
Shampoo's (runs where an optimizer does not reach the target count as "not reached"; the
median is then over the seeds where it did, and the table says how many).

Workloads (``--workloads``; on a 2-core CPU the autoencoder and the character LM take
minutes per seed, the classifier about 30; ``--quick`` shrinks everything to a smoke test):

- ``autoencoder``: ``examples/autoencoder.py``, all of Fashion-MNIST, 3 epochs, batch
  1000, the paper's recipe (the demo's seven optimizers, Muon and Sophia);
- ``classifier``: ``examples/classifier.py`` with ResNet-8 of width 8 (8/16/32 channels),
  all 60,000 training and 10,000 test images, 6 epochs, the test set evaluated every 141
  steps (SGD, AdamW, Eva, Eva-s, K-FAC, Shampoo, Muon, Sophia: a step costs about 0.07 s on
  a 2-core CPU, an epoch of 468 steps about 35 s);
- ``char_lm``: ``examples/char_lm.py``, the fortunes corpus, 3 epochs of 100 steps, test
  loss on 10 batches (SGD, AdamW, Eva, Eva-s, K-FAC, Muon, Sophia).

Outputs in ``--out`` (default ``benchmarks/results/convergence``): ``convergence.md`` and
``convergence.json`` (the tables, every run's numbers, the machine and library versions),
and, per workload and seed, the example's own directory (``results.md``, ``metrics.json``,
``metrics.csv``, ``loss_vs_epoch.png``, ``loss_vs_time.png``). With ``--readme`` the
headline table replaces the text between ``<!-- convergence:start -->`` and
``<!-- convergence:end -->`` in that file.

Usage::

    python -m benchmarks.convergence                         # everything, seeds 0,1,2
    python -m benchmarks.convergence --workloads autoencoder --seeds 0 --readme README.md
    python -m benchmarks.convergence --quick --out /tmp/conv  # smoke test
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import readme
from examples.harness import report
from examples.harness.records import dumps
from examples.harness.training import Result

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
  name: str  # also the example's module name (examples.<name>)
  title: str
  argv: tuple[str, ...]  # the example's flags for the full benchmark
  quick: tuple[str, ...]  # the flags for --quick
  seeds: int  # default number of seeds
  quality: str = "train loss (mean of the last 10 step losses)"  # SGD's final quality
  subject: str = ""  # the title without its budget (the protocol and the knob study name theirs)


WORKLOADS = {
  w.name: w
  for w in (
    Workload(
      "autoencoder",
      "Fashion-MNIST autoencoder (3 epochs, batch 1000)",
      ("--epochs", "3", "--optimizers", "sgd,adamw,eva,eva-f,eva-s,kfac,shampoo,muon,sophia"),
      (
        "--epochs",
        "1",
        "--train-limit",
        "2000",
        "--test-limit",
        "500",
        "--optimizers",
        "sgd,eva,kfac,shampoo",
      ),
      3,
      subject="Fashion-MNIST autoencoder",
    ),
    Workload(
      "classifier",
      "Fashion-MNIST ResNet-8 classifier (60k images, 6 epochs)",
      (
        "--depth",
        "8",
        "--width",
        "8",
        "--epochs",
        "6",
        "--eval-every",
        "141",
        "--optimizers",
        "sgd,adamw,eva,eva-s,kfac,shampoo,muon,sophia",
      ),
      ("--epochs", "1", "--train-limit", "256", "--test-limit", "128", "--optimizers", "sgd,eva"),
      2,
      "test accuracy (last evaluation)",
      subject="Fashion-MNIST ResNet classifier",
    ),
    Workload(
      "char_lm",
      "character-level transformer on fortunes (3 × 100 steps)",
      (
        "--epochs",
        "3",
        "--steps-per-epoch",
        "100",
        "--eval-batches",
        "10",
        "--optimizers",
        "sgd,adamw,eva,eva-s,kfac,muon,sophia",
      ),
      (
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--seq-len",
        "32",
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--optimizers",
        "sgd,eva",
      ),
      2,
      "test loss (last evaluation)",
      subject="character-level transformer on fortunes",
    ),
  )
}


def load_example(name: str) -> Any:
  """The example ``examples/<name>.py``, imported as the module ``examples.<name>``."""
  return importlib.import_module(f"examples.{name}")


def _median(values: Sequence[float]) -> float | None:
  return statistics.median(values) if values else None


def summarise(runs: list[list[Result]]) -> dict[str, dict[str, Any]]:
  """Per optimizer, medians over seeds (``runs``: one list of results per seed)."""
  names = list(dict.fromkeys(r.name for results in runs for r in results))
  out: dict[str, dict[str, Any]] = {}
  for name in names:
    per_seed = [next(r for r in results if r.name == name) for results in runs]
    sgd = [next((r for r in results if r.key == "sgd"), None) for results in runs]
    ratios = [
      r.time_to_target / s.time_to_target
      for r, s in zip(per_seed, sgd)
      if r.time_to_target is not None and s is not None and s.time_to_target
    ]
    row: dict[str, Any] = {
      "key": per_seed[0].key,
      "lr": per_seed[0].lr,
      "seeds": len(per_seed),
      "reached": sum(r.time_to_target is not None for r in per_seed),
      "diverged": sum(r.diverged for r in per_seed),
      "time_to_target_s": _median(
        [r.time_to_target for r in per_seed if r.time_to_target is not None]
      ),
      "ratio_to_sgd": _median(ratios),
      "seconds_per_epoch": _median(
        [sum(r.epoch_times) / len(r.epoch_times) for r in per_seed if r.epoch_times]
      ),
      "state_mib": per_seed[0].state_bytes / 2**20,
    }
    for metric in ("train_loss", "test_loss", "test_accuracy"):
      values = [r.final(metric) for r in per_seed]
      values = [v for v in values if v == v]  # drop NaN (not measured)
      if values:
        row[f"final_{metric}"] = _median(values)
    out[name] = row
  return out


def headline(runs: list[list[Result]]) -> dict[str, Any]:
  """Eva's time to the target over SGD's, K-FAC's and Shampoo's (medians over the seeds
  where both reached it), and in how many seeds Eva reached it."""
  ratios: dict[str, list[float]] = {}
  reached = 0
  for results in runs:
    by_key = {r.key: r for r in results}
    eva = by_key.get("eva")
    if eva is None or eva.time_to_target is None:
      continue
    reached += 1
    for other in ("sgd", "kfac", "shampoo"):
      o = by_key.get(other)
      if o is not None and o.time_to_target:
        ratios.setdefault(other, []).append(eva.time_to_target / o.time_to_target)
  return {"eva_reached": reached, **{f"eva_over_{k}": _median(v) for k, v in ratios.items()}}


def _f(v: Any, fmt: str) -> str:
  return "–" if v is None else format(v, fmt)


def workload_table(summary: dict[str, dict[str, Any]], quality: str = "quality") -> str:
  """One row per optimizer; ``quality`` says what SGD's final quality is (one definition,
  the one the times are measured to)."""
  has_acc = any("final_test_accuracy" in row for row in summary.values())
  head = ["optimizer", "lr", "final train loss (last epoch's mean)", "final test loss"]
  head += ["final test accuracy"] if has_acc else []
  head += ["s/epoch", f"time to SGD's final {quality} (s)", "× SGD", "reached", "state (MiB)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in summary.items():
    cells = [
      name,
      f"{row['lr']:g}",
      _f(row.get("final_train_loss"), ".4g"),
      _f(row.get("final_test_loss"), ".4g"),
    ]
    cells += [_f(row.get("final_test_accuracy"), ".4f")] if has_acc else []
    cells += [
      _f(row["seconds_per_epoch"], ".1f"),
      _f(row["time_to_target_s"], ".1f"),
      _f(row["ratio_to_sgd"], ".2f"),
      f"{row['reached']}/{row['seeds']}",
      f"{row['state_mib']:.1f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def headline_table(all_headlines: dict[str, dict[str, Any]], seeds: dict[str, int]) -> str:
  lines = [
    "| workload | Eva reached SGD's quality | Eva time / SGD time | Eva / K-FAC | Eva / Shampoo |",
    "|---|---|---|---|---|",
  ]
  for name, h in all_headlines.items():
    lines.append(
      f"| {WORKLOADS[name].title} | {h.get('eva_reached', 0)} of {seeds[name]} seeds "
      f"| {_f(h.get('eva_over_sgd'), '.2f')} "
      f"| {_f(h.get('eva_over_kfac'), '.2f')} | {_f(h.get('eva_over_shampoo'), '.2f')} |"
    )
  return "\n".join(lines) + "\n"


def update_readme(path: Path, text: str) -> None:
  """Replace the block between the convergence markers of ``path`` with ``text``."""
  readme.update(path, "convergence", text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.convergence",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--workloads",
    default=",".join(WORKLOADS),
    help=f"comma-separated subset of {','.join(WORKLOADS)}",
  )
  p.add_argument(
    "--seeds",
    default=None,
    help="comma-separated seeds (default: 0..n-1, n per workload: "
    + ", ".join(f"{w.name} {w.seeds}" for w in WORKLOADS.values())
    + ")",
  )
  p.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convergence"))
  p.add_argument("--readme", default=None, help="put the headline table into this README")
  p.add_argument("extra", nargs="*", help="more flags for every example (after --)")
  args = p.parse_args(argv)
  names = [w.strip() for w in args.workloads.split(",") if w.strip()]
  unknown = [w for w in names if w not in WORKLOADS]
  if unknown or not names:
    p.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
  args.names = names
  try:
    args.seed_list = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  summaries, headlines, seeds_used, tables = {}, {}, {}, {}
  for name in args.names:
    w = WORKLOADS[name]
    example = load_example(name)
    seeds = args.seed_list or ([0] if args.quick else list(range(w.seeds)))
    runs = []
    for seed in seeds:
      print(f"\n=== {w.title}, seed {seed}")
      flags = list(w.quick if args.quick else w.argv) + list(args.extra)
      flags += ["--seed", str(seed), "--out", str(out / name / f"seed{seed}"), "--no-checkpoint"]
      runs.append(example.main(flags))
    summaries[name] = summarise(runs)
    headlines[name] = headline(runs)
    seeds_used[name] = len(seeds)
    tables[name] = workload_table(summaries[name], w.quality)

  info = report.machine_info()
  machine = (
    f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    + f". Command: `python -m benchmarks.convergence {' '.join(argv or sys.argv[1:])}`."
  )
  head = headline_table(headlines, seeds_used)
  md = ["# Convergence in wall-clock time\n", head, machine + "\n"]
  for name in args.names:
    md += [f"\n## {WORKLOADS[name].title}\n", tables[name]]
  (out / "convergence.md").write_text("\n".join(md))
  (out / "convergence.json").write_text(
    dumps(
      {
        "machine": info,
        "headline": headlines,
        "seeds": seeds_used,
        "workloads": {
          n: {
            "argv": list(WORKLOADS[n].quick if args.quick else WORKLOADS[n].argv),
            "optimizers": summaries[n],
          }
          for n in args.names
        },
      }
    )
  )
  print("\n" + "\n".join(md))
  if args.readme:
    update_readme(Path(args.readme), head + "\n" + machine + "\n")
  print(
    f"wrote {out / 'convergence.md'}, {out / 'convergence.json'} "
    f"({time.perf_counter() - started:.0f}s)"
  )
  return {"summaries": summaries, "headline": headlines}


if __name__ == "__main__":
  main()
