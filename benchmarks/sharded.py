"""Eva and the baselines on sharded meshes: collectives, state per device, ops, step time.

The model is the MaxText-style decoder of ``examples/harness/sharded.py`` (logical axis
names on the parameters, logical constraints on the activations), by default d_model 64,
8 heads (so that 8 devices on ``model`` divide them), MLP 256, vocabulary 64, sequence 16,
batch 16, at 1 and 2 layers for every optimizer and 4 layers for SGD and Eva (the depth
scaling of Eva's extra collectives). Every optimizer of the examples' registry
(``examples/harness/optimizers.py``: SGD, AdamW, Eva, Eva-f, Eva-s, K-FAC, Shampoo, Muon;
momentum 0.9, weight decay 5e-4, K-FAC's factors and inverses and Shampoo's roots every 10
steps; ``layouts=`` from an abstract capture where the optimizer takes them) trains it with
one jitted step (gradient and statistics, optimizer update, ``optax.apply_updates``;
parameters and state donated), the parameters placed by the logical axis rules, the
optimizer state by ``eva_optax.state_shardings``, the batch over ``data``. Four meshes of 8
host devices:

- ``data``: mesh (8, 1), rules ``data`` (parameters replicated);
- ``tp``: mesh (2, 4), rules ``tp`` (Megatron over ``model``, batch over ``data``);
- ``model``: mesh (1, 8), rules ``tp``;
- ``fsdp``: mesh (8, 1), rules ``fsdp`` (``embed`` axis of every parameter over ``data``).

Measured per depth, optimizer and mesh, from the compiled step
(``examples.harness.compiled_ops``): the collectives by kind (count and bytes of their
results per device; a collective inside a ``cond`` counts once, whether or not the step
takes that branch) and by the mesh axes their replica groups span, the top-level
operations (``total_ops``), the optimizer state's bytes on one device and the ratio of all
devices' bytes to the logical size (1: fully sharded; 8: replicated), and the step time on
the host devices: the median over ``--rounds`` of the mean time of ``--steps`` consecutive
steps (whole periods of K-FAC and Shampoo), after ``--warmup`` steps. The 8 devices are 8
XLA devices of one process sharing this machine's cores: the times are CPU numbers, which
say nothing of an accelerator's step. A job that fails (e.g. an optimizer whose state
``state_shardings`` cannot place) is reported with its error, not skipped.

Projection (not with ``--quick``):

- mesh size: the SGD and Eva steps lowered and compiled, not run, on ``--large-devices``
  host devices (default 64 and 256, one process each; meshes (n, 1) with the ``data`` and
  ``fsdp`` rules, (n/8, 8) with ``tp``), to see whether the collectives' count changes with
  the mesh's size; also a second width (``--width-check``) on the ``tp`` mesh;
- Eva's extra all-reduced floats against a model (its statistics on one device + a fitted
  number of scalars per preconditioned layer), checked on every setting measured;
- an α-β model of Eva's extra time per step for a GPT-2-small-sized decoder on a data x
  model 4 mesh of 64 and 256 accelerators: once with the extra collectives' counts measured
  on the small decoder and their sizes from the model at GPT-2-small's depth and width, once
  with the extra collectives of the GPT-2-small-sized step itself, compiled on 64 and 256
  host devices. The markdown states the model and its assumptions.

Output: a table on stdout and, unless ``--no-save`` (or ``--quick``),
``benchmarks/results/sharded.{json,md}`` (summarised in docs/multi_device.md, "Sharded parameters").
Every 8-device job runs in one worker process (``--workers`` to split them), the large
meshes in one process per device count; all import the library at the start, so that they
measure the same code. With ``--in-process`` (the default of ``--quick`` when this process
already has 8 devices, as under the test suite) the 8-device jobs run here.

Usage::

    python -m benchmarks.sharded                      # everything, results saved (~12 min)
    python -m benchmarks.sharded --quick              # depth 1, SGD and Eva, mesh tp
    python -m benchmarks.sharded --depths 1,2 --optimizers sgd,eva --meshes tp,fsdp

This module is the command line and the plan of the jobs. The meshes, the model's size and a
job are in ``benchmarks/sharded_config.py``, the measurement and the worker processes in
``benchmarks/sharded_worker.py``, the analysis and the projection in
``benchmarks/sharded_analysis.py``, the tables in ``benchmarks/sharded_tables.py``; the
collectives are read by ``examples/harness/compiled_ops.py``.
"""

from __future__ import annotations

import os

# As in benchmarks/step_time.py: one OpenBLAS thread (set before numpy and jax are imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.records import save_report
from benchmarks.sharded_analysis import (
  Assumptions,
  add_extra,
  eva_breakdown,
  mesh_size_check,
  projection,
)
from benchmarks.sharded_config import (
  DEVICE_FLAG,
  DEVICES,
  LEARNING_RATE,
  MESHES,
  OPTIMIZERS,
  RESULTS,
  Job,
  ModelConfig,
  large_meshes,
  split,
)
from benchmarks.sharded_tables import markdown, text_table
from benchmarks.sharded_worker import Jobs, library_state, run_workers, worker

# ---------------------------------------------------------------------------
# Driver.


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def _env_devices() -> int:
  """The host device count the ``XLA_FLAGS`` of this process ask for (1 if none)."""
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith(DEVICE_FLAG + "="):
      return int(flag.split("=", 1)[1])
  return 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.sharded", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--depths", default="1,2", help="depths of every optimizer")
  p.add_argument(
    "--scaling-depths",
    default="4",
    help="more depths, SGD and Eva only (the depth scaling of Eva's extra)",
  )
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  p.add_argument("--meshes", default=",".join(MESHES), help=f"of {','.join(MESHES)}")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10, help="steps per round (whole periods)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--large-devices",
    default="64,256",
    help="device counts of the compile-only mesh-size check ('' for none)",
  )
  p.add_argument("--large-depths", default="1,2")
  p.add_argument(
    "--width-check",
    type=int,
    default=128,
    help="a second d_model (MLP 4x) for SGD and Eva on tp, compiled only (0: none)",
  )
  p.add_argument(
    "--no-gpt2-check",
    dest="gpt2_check",
    action="store_false",
    help="skip compiling the GPT-2-small-sized steps on the large meshes",
  )
  p.add_argument(
    "--workers",
    type=int,
    default=1,
    help="8-device worker processes compiling at once (XLA's compiler already "
    "uses several threads: on 2 cores 2 workers are slower)",
  )
  p.add_argument(
    "--in-process",
    action="store_true",
    help="measure the 8-device meshes in this process (its XLA_FLAGS must give "
    "8 devices); the default with --quick when they do",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="depth 1, SGD and Eva, mesh tp, 2 x 2 steps, no projection compile, nothing saved",
  )
  p.add_argument("--json", default=str(RESULTS / "sharded.json"))
  p.add_argument("--md", default=str(RESULTS / "sharded.md"))
  p.add_argument("--no-save", action="store_true")
  p.add_argument(
    "--reanalyse",
    metavar="JSON",
    default=None,
    help="no measurement: the analysis and tables again from a saved run's "
    "records (e.g. after a change of the projection's model)",
  )
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.depths, args.optimizers, args.meshes = "1", "sgd,eva", "tp"
    args.scaling_depths = ""
    args.warmup, args.rounds, args.steps = 1, 2, 2
    args.large_devices, args.width_check, args.no_save = "", 0, True
    args.in_process = args.in_process or _env_devices() >= DEVICES
  args.depths = _ints(args.depths)
  args.scaling_depths = [d for d in _ints(args.scaling_depths) if d not in args.depths]
  args.large_devices = _ints(args.large_devices)
  args.large_depths = _ints(args.large_depths)
  args.optimizers = [w.strip().lower() for w in args.optimizers.split(",") if w.strip()]
  if "sgd" not in args.optimizers:
    args.optimizers.insert(0, "sgd")  # the reference of every "extra" column
  args.meshes = [w.strip() for w in args.meshes.split(",") if w.strip()]
  from examples.harness import optimizers

  unknown = [k for k in args.optimizers if k not in optimizers.SPEC_BY_KEY]
  if unknown:
    p.error(f"--optimizers: unknown {unknown}")
  if set(args.meshes) - set(MESHES):
    p.error(f"--meshes: unknown {sorted(set(args.meshes) - set(MESHES))}")
  return args


def plan_jobs(args: argparse.Namespace) -> tuple[list[Job], dict[int, list[Job]], str]:
  """The jobs on 8 devices and, per larger device count, the compile-only ones; and a
  note on the large meshes left out (a dimension the mesh cannot divide)."""
  model = ModelConfig()
  jobs = [
    Job(k, d, MESHES[m], model, True)
    for m in args.meshes
    for d in args.depths
    for k in args.optimizers
  ]
  jobs += [
    Job(k, d, MESHES[m], model, True)
    for m in args.meshes
    for d in args.scaling_depths
    for k in ("sgd", "eva")
    if k in args.optimizers
  ]
  if args.width_check and "tp" in args.meshes and "eva" in args.optimizers:
    wide = ModelConfig(d_model=args.width_check, mlp_dim=4 * args.width_check)
    jobs += [
      Job(k, d, MESHES["tp"], wide, False) for d in args.large_depths for k in ("sgd", "eva")
    ]
  large: dict[int, list[Job]] = {}
  skipped = []
  for n in args.large_devices:
    for name, mesh in large_meshes(n).items():
      if name not in args.meshes:
        continue
      if mesh.rules == "fsdp" and model.d_model % mesh.shape[0]:
        skipped.append(f"{mesh.label} (d_model {model.d_model} is not a multiple of {n})")
        continue
      large.setdefault(n, []).extend(
        Job(k, d, mesh, model, False)
        for d in args.large_depths
        for k in ("sgd", "eva")
        if k in args.optimizers
      )
  if args.gpt2_check and "eva" in args.optimizers:
    a = Assumptions()
    for n in args.large_devices:
      if n in a.accelerators:
        large.setdefault(n, []).extend(
          Job(k, a.depth, a.mesh(n), a.model, False) for k in ("sgd", "eva")
        )
  note = ("Not compiled: " + "; ".join(skipped) + ".") if skipped else ""
  return jobs, large, note


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.worker is not None:
    worker(args.worker)
    return None
  if args.reanalyse:
    return reanalyse(args)
  start = time.perf_counter()
  jobs, large, note = plan_jobs(args)
  large_plan = list(large.items())  # compile only, one process per device count
  if args.in_process:
    import jax

    if jax.device_count() < DEVICES:
      raise SystemExit(
        f"--in-process: {jax.device_count()} devices, {DEVICES} wanted "
        f"(XLA_FLAGS={DEVICE_FLAG}={DEVICES})"
      )
    libraries = [library_state()]
    local = Jobs(jobs)
    local.compile()
    records = local.time(args)
    if large_plan:
      more, seen = run_workers(large_plan, args)
      records += more
      libraries += seen
  else:
    parts = [(DEVICES, part) for part in split(jobs, args.workers)]
    records, libraries = run_workers(parts + large_plan, args, parallel=args.workers)
  report = {
    "benchmark": "sharded",
    "command": "python -m benchmarks.sharded"
    + (
      " " + " ".join(argv)
      if argv
      else " " + " ".join(sys.argv[1:])
      if argv is None and sys.argv[1:]
      else ""
    ),
    "machine": _machine_info(),
    "library": libraries[0],
    "library_changed_during_run": len({json.dumps(x, sort_keys=True) for x in libraries}) > 1,
    "settings": {
      "depths": args.depths,
      "scaling_depths": args.scaling_depths,
      "optimizers": args.optimizers,
      "meshes": args.meshes,
      "model": asdict(ModelConfig()),
      "warmup": args.warmup,
      "rounds": args.rounds,
      "steps": args.steps,
      "seed": args.seed,
      "large_devices": args.large_devices,
      "large_depths": args.large_depths,
      "width_check": args.width_check,
      "gpt2_check": args.gpt2_check,
      "learning_rate": LEARNING_RATE,
    },
    "total_s": time.perf_counter() - start,
    "records": records,
    "large_note": note,
  }
  report["command"] = report["command"].rstrip()
  analyse(report)
  _write(report, args)
  return report


def analyse(report: dict[str, Any]) -> None:
  """The report's analysis from its records: extra over SGD, Eva's breakdown, the mesh
  size check, the projection."""
  records = report["records"]
  add_extra(records)
  report["breakdown"] = eva_breakdown(records)
  report["mesh_check"] = mesh_size_check(records)
  settings = report["settings"]
  depths = len(settings["depths"]) + len(settings.get("scaling_depths", []))
  report["projection"] = projection(report["breakdown"], records) if depths > 1 else {}


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
  print()
  print(text_table(report["records"]))
  print()
  print(markdown(report))
  if not args.no_save:
    print(save_report(report, args.json, args.md, markdown(report)))


def reanalyse(args: argparse.Namespace) -> dict[str, Any]:
  """``--reanalyse``: a saved report's analysis and tables again, measurements unchanged."""
  report = json.loads(Path(args.reanalyse).read_text())
  analyse(report)
  _write(report, args)
  return report


def _machine_info() -> dict[str, Any]:
  """``examples.harness.report.machine_info`` without the devices (the workers own them)."""
  from examples.harness import report

  return report.machine_info(devices=False)


if __name__ == "__main__":
  main()
