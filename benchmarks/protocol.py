"""The tuning protocol on one workload: every optimizer tuned alike, then several seeds.

Runs :func:`examples.harness.protocol.run_protocol` on an example of ``examples/`` (the
workloads of ``benchmarks/convergence.py``, with their flags): a learning-rate grid (and a
damping grid for the second-order optimizers, a KL-clip grid for Eva) scored on a
validation split held out of the training set with a whole schedule over a fraction of the
budget, then the chosen values on the whole budget for several seeds, interleaved, next to
the paper's recipe ("as published"), and the budget to quality: the chosen values with a
whole schedule over 25, 50, 75 and 100 % of the budget, and the shortest of them that
reaches SGD's whole-budget quality. The grids, every trial's score, the chosen values and
the final tables go into ``protocol.md`` and ``protocol.json`` in ``--out`` (default
``benchmarks/results/protocol/<workload>``), with the example's own report per seed.

The example's ``--damping`` and ``--kl-clip`` are not used: the protocol sets them.

``--tuning-from`` reads the tuning (grids, trials, chosen values) from an earlier run's
``protocol.json`` instead of running it again, to give the final runs more seeds; the
workload's flags and the tuning settings must be the ones it was tuned with.
``--tune-only`` runs and records the tuning alone, so that a long protocol splits into
its tuning and its final runs (``--tuning-from`` that record). ``--tuning-from`` takes
several records, comma-separated, each tuning other optimizers with the same settings: a
long tuning splits into groups of optimizers, run side by side or in different sessions.
``--tune-only --per-optimizer`` writes one record per optimizer (``<out>/<key>/``) and
skips those already written, so that a tuning stopped midway resumes where it stopped;
``--tuning-from <out>`` reads every record of that folder. The final runs are kept per
seed and budget as they finish (``<out>/runs/``); ``--resume`` reads back those of a
stopped run of the same command instead of running them again, and resumes the one it
stopped in from each optimizer's last finished epoch (its checkpoints, kept while it runs).

Usage::

    python -m benchmarks.protocol --workload autoencoder                     # seeds 0,1,2
    python -m benchmarks.protocol --workload classifier --optimizers sgd,adamw,eva \\
        -- --epochs 3 --train-limit 6000 --test-limit 2000
    python -m benchmarks.protocol --quick --out /tmp/protocol                # smoke test
    python -m benchmarks.protocol --workload classifier --seeds 0,1 \\
        --tuning-from benchmarks/results/protocol/classifier/protocol.json
    python -m benchmarks.protocol --workload char_lm --tune-only --out /tmp/char_lm_tuning
    python -m benchmarks.protocol --workload char_lm --optimizers sgd,eva \\
        --tuning-from /tmp/tuned_sgd/protocol.json,/tmp/tuned_eva/protocol.json
    python -m benchmarks.protocol --workload classifier --tune-only --per-optimizer \\
        --out /tmp/classifier_tuning          # again after a stop: resumes
    python -m benchmarks.protocol --workload classifier --tuning-from /tmp/classifier_tuning
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.convergence import WORKLOADS, load_example
from examples.harness.optimizers import Options
from examples.harness.protocol import Outcome, Protocol, run_protocol
from examples.harness.protocol_records import merged_records
from examples.harness.protocol_search import RecordMismatch
from examples.harness.records import jsonable
from examples.harness.training import Task

ROOT = Path(__file__).resolve().parents[1]


def _ints(text: str, flag: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(","))
  except ValueError:
    raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.protocol",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--workload", default="autoencoder", choices=sorted(WORKLOADS))
  p.add_argument(
    "--optimizers", default=None, help="comma-separated keys (default: the workload's set)"
  )
  p.add_argument("--seeds", default=None, help="seeds of the final runs (default 0,1,2)")
  p.add_argument(
    "--tune-fraction",
    type=float,
    default=None,
    help="tuning runs: a whole schedule over this fraction of the budget "
    f"(default {Protocol.tune_fraction})",
  )
  p.add_argument(
    "--validation-fraction",
    type=float,
    default=None,
    help=f"of the training set, held out for tuning (default {Protocol.validation_fraction})",
  )
  p.add_argument(
    "--lr-points",
    type=int,
    default=None,
    help=f"learning rates in the grid, at least 5 (default {Protocol.lr_points})",
  )
  p.add_argument(
    "--budgets",
    default=None,
    help="fractions of the budget for the budget-to-quality runs "
    "ending with the whole budget 1 (default 0.25,0.5,0.75,1; 1 alone skips them; with "
    "--resume the whole runs already finished are read back)",
  )
  p.add_argument(
    "--budget-seeds",
    default=None,
    help="seeds of the budget-to-quality runs, among --seeds (default: all)",
  )
  p.add_argument(
    "--quick", action="store_true", help="the workload's tiny flags and one seed: a smoke test"
  )
  p.add_argument(
    "--tuning-from",
    default=None,
    metavar="PROTOCOL_JSON[,...]",
    help="read the tuning from an earlier run's protocol.json instead of "
    "running it (same workload flags and tuning settings); several, comma-separated, "
    "each tuning other optimizers, are merged",
  )
  p.add_argument(
    "--tune-only",
    action="store_true",
    help="run and record the tuning only (protocol.json), for a later --tuning-from",
  )
  p.add_argument(
    "--per-optimizer",
    action="store_true",
    help="with --tune-only: one record per optimizer (OUT/<key>/protocol.json), skipping "
    "those already recorded, so that a long tuning resumes where it stopped; "
    "--tuning-from OUT reads them all",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="read back the final runs that a stopped run of the same command finished "
    "(OUT/runs/, kept per seed and budget) instead of running them again",
  )
  p.add_argument("--out", default=None)
  p.add_argument("extra", nargs="*", help="more flags for the example (after --)")
  args = p.parse_args(argv)
  settings: dict[str, Any] = {}
  if args.seeds is not None:
    settings["seeds"] = _ints(args.seeds, "--seeds")
  elif args.quick:
    settings["seeds"] = (0,)
  if args.budgets is not None:
    try:
      settings["budgets"] = tuple(float(v) for v in args.budgets.split(","))
    except ValueError:
      p.error(f"--budgets: expected comma-separated fractions, got {args.budgets!r}")
  if args.budget_seeds is not None:
    settings["budget_seeds"] = _ints(args.budget_seeds, "--budget-seeds")
  for name in ("tune_fraction", "validation_fraction", "lr_points"):
    if getattr(args, name) is not None:
      settings[name] = getattr(args, name)
  if args.per_optimizer and not args.tune_only:
    p.error("--per-optimizer records tunings: it needs --tune-only")
  try:
    args.protocol = Protocol(**settings)
  except ValueError as e:
    p.error(str(e))
  args.out = Path(args.out or ROOT / "benchmarks" / "results" / "protocol" / args.workload)
  return args


# The example's settings that do not change what a tuning run does.
NOT_TUNING = (
  "command",
  "out",
  "seed",
  "optimizers",
  "resume",
  "checkpoint",
  "no_checkpoint",
  "tuning_from",
)


def read_recorded(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
  """An earlier run's ``protocol.json``, checked to have been tuned on the example with
  the same ``settings`` (but for :data:`NOT_TUNING`); exits naming the first that differs."""
  try:
    document = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise SystemExit(f"--tuning-from {path}: cannot read it ({e})") from None
  if "tuning" not in document or "settings" not in document:
    raise SystemExit(f"--tuning-from {path}: not a protocol.json (no tuning recorded)")
  theirs = document["settings"]
  for key in sorted(set(settings) | set(theirs)):
    if key not in NOT_TUNING and theirs.get(key) != jsonable(settings.get(key)):
      raise SystemExit(
        f"--tuning-from {path}: it was tuned with {key} = "
        f"{theirs.get(key)!r}, this run has {settings.get(key)!r}"
      )
  return document


def record_paths(text: str) -> list[Path]:
  """The records ``--tuning-from`` names: comma-separated ``protocol.json`` files, or
  folders of per-optimizer records (``--per-optimizer``'s ``<key>/protocol.json``)."""
  paths = []
  for part in text.split(","):
    path = Path(part)
    if path.is_dir():
      found = sorted(path.glob("*/protocol.json"))
      if not found:
        raise SystemExit(f"--tuning-from {path}: a folder without <optimizer>/protocol.json")
      paths += found
    else:
      paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> Outcome | None:
  args = parse_args(argv)
  w = WORKLOADS[args.workload]
  example = load_example(w.name)
  flags = list(w.quick if args.quick else w.argv) + list(args.extra)
  if args.optimizers:
    flags += ["--optimizers", args.optimizers]
  example_args = example.parse_args(flags)

  def make_task(validation_fraction: float) -> Task:
    return example.make_task(
      argparse.Namespace(**{**vars(example_args), "validation_fraction": validation_fraction})
    )

  base = Options(example_args.momentum, example_args.weight_decay)
  settings = {k: v for k, v in vars(example_args).items() if k != "specs"}
  settings["command"] = "python -m benchmarks.protocol " + " ".join(argv or sys.argv[1:])
  recorded = None
  if args.tuning_from:
    documents = [read_recorded(path, settings) for path in record_paths(args.tuning_from)]
    try:
      recorded = merged_records(documents)
    except RecordMismatch as e:
      raise SystemExit(f"--tuning-from {args.tuning_from}: {e}") from None
    settings["tuning_from"] = args.tuning_from

  def run(specs: Sequence[Any], out: Path) -> Outcome:
    try:
      outcome = run_protocol(
        make_task,
        specs,
        args.protocol,
        base,
        example_args.epochs,
        out,
        title=w.subject,
        eval_every=example_args.eval_every,
        chunk=example_args.chunk,
        window=example_args.reach_window,
        settings=settings,
        recorded=recorded,
        tune_only=args.tune_only,
        resume=args.resume,
      )
    except RecordMismatch as e:
      if recorded is None:
        raise
      raise SystemExit(f"--tuning-from {args.tuning_from}: {e}") from None
    print("\n" + (out / "protocol.md").read_text())
    print(f"wrote {out / 'protocol.md'}, {out / 'protocol.json'}")
    return outcome

  if not args.per_optimizer:
    return run(example_args.specs, args.out)
  outcome = None
  for spec in example_args.specs:
    out = args.out / spec.key
    if (out / "protocol.json").is_file():
      print(f"{spec.name}: tuned already ({out / 'protocol.json'}), not run again")
    else:
      outcome = run([spec], out)
  return outcome


if __name__ == "__main__":
  main()
