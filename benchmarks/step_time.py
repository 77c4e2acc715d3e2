"""Step time, compiled op count and optimizer-state size of Eva, its variants and baselines.

Workloads, each trained with synthetic random data (the numbers are step times and
op counts, not accuracies; the data only has to have the right shapes). The default
three (``make bench``) are sized for a CPU:

- ``autoencoder``: the deep autoencoder of the Eva paper, an MLP
  784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, MSE), batch 1000;
- ``resnet``: a small ResNet-style CNN with BatchNorm (3x3 conv 16 channels, then
  3 stages of 2 residual blocks with 16/32/64 channels and strides 1/2/2, global
  average pooling, Dense 10) on 28x28x1 inputs, batch 128, cross-entropy; the
  BatchNorm ``batch_stats`` are the model state;
- ``transformer``: a 4-layer pre-LN decoder-only transformer (d_model 256,
  4 heads, MLP 1024, sequence 128, batch 16, vocabulary 256), causal attention
  written by hand with ``nn.DenseGeneral`` q/k/v projections
  (``features=(heads, head_dim)``) and output projection (``axis=(-2, -1)``),
  next-token cross-entropy.

Also sized for a CPU, not in the default three: ``cnn``, three 3x3 convolutions (32
channels, with bias, ReLU) without BatchNorm, global average pooling and Dense 10, on
28x28x1 inputs, batch 128 (a conv net whose ḡ is not zeroed by a normalisation).

Realistic ones, sized for a GPU (``--workloads all`` or by name; ``--tiny`` shrinks
them so that their code runs on a CPU in seconds):

- ``resnet18``, ``resnet18-b512``: the CIFAR-style ResNet-18 (3x3 stem 64, 4 stages of
  2 basic blocks with 64/128/256/512 channels and strides 1/2/2/2, BatchNorm, no conv
  biases, global average pooling, Dense 10) on 32x32x3 inputs, batch 128 and 512;
- ``gpt``: a GPT-style decoder LM, the transformer above at GPT-2-small size
  (12 layers, d_model 768, 12 heads, MLP 3072, sequence 512, vocabulary 32768), batch 8;
- each of these with ``-bf16`` (``resnet18-bf16``, ``resnet18-b512-bf16``,
  ``gpt-bf16``): the model computes in bfloat16 (``dtype=jnp.bfloat16``), the
  parameters, the optimizer and the loss stay float32.

The models are those of the examples (``examples/harness/models.py``), the transformers
with their blocks unrolled (``scan=False``).

Optimizers (``--optimizers``, default all; ``sgd`` is always included, it is the
reference): the registry of the examples, ``examples/harness/optimizers.py`` (keys
``sgd, adamw, eva, eva-f, eva-s, kfac, foof, shampoo, muon``; ``eva_foof`` and
``eva_shampoo`` are accepted for ``eva-f`` and ``eva-s``), each built by
``Spec.build`` with the workload's learning rate and the registry's defaults
(momentum 0.9, weight decay 5e-4; K-FAC and FOOF with factors and inverses every 10
steps, Shampoo with roots every 10), and ``layouts=`` from an abstract capture pass
(``jax.eval_shape``) for those that take it. Each optimizer step is the examples'
training step (``examples.harness.training.make_step``): one jitted function (gradient,
optimizer update, ``optax.apply_updates``) with donated parameter, model-state and
optimizer-state buffers.

Timing. Every step is compiled and run once first, then ``--warmup`` more
untimed steps. Then, for each round, every optimizer is timed in turn, back to
back (``block_until_ready`` at the end of each group), so all see the same
machine conditions. An optimizer without a period runs ``k`` =
``--steps-per-round`` steps per round. K-FAC, FOOF and Shampoo recompute their
inverses (or inverse roots) only every ``period`` steps (10), so a single step, or a
median of single steps, would miss that cost: they run ``ceil(k / period) * period``
consecutive steps per round (whole periods, so each round contains exactly
``n / period`` inverse steps whatever the phase), and their per-round time is the
average per step over those steps. The table reports, per optimizer, the median over
rounds of the wall-clock time per step and its ratio to SGD. The text table gives
three other estimates of the same ratio (median of the per-round ratios, ratio of the
fastest rounds, ratio of the median process CPU time per step) and the spread of the
rounds: on a shared machine the wall time of a step can change by tens of percent
from one second to the next, and the CPU-time ratio is then the most stable of the
four.

Op counts (``--ops``). On a GPU a step of these models is bound by kernel launches more
than by FLOPs. ``--ops`` prints, per workload, the top-level operations of each compiled
step (``examples.harness.compiled_ops``: the entry computation's instructions that do work,
read from the same compiled object that is timed), their ratio to SGD's, the extra operations
per preconditioned layer (``(ops - SGD's ops) / layers``, with ``layers`` the
``LayerStats`` entries of the capture for the optimizers that capture statistics, the
parameters of rank >= 2 for the plain-gradient ones), the operations by kind (fusion,
dot, convolution, copy, other) and the compile time. ``--ops-only`` compiles every step
from abstract shapes (nothing allocated, nothing timed) and prints only that table.
``--merge A.json B.json ...`` prints and writes the tables of several runs' JSON files
as one (every variant of every workload; the first run's wins).

Profile (``--profile DIR``). After the timed rounds, ``--profile-steps`` steps (whole
periods) of each optimizer of ``--profile-optimizers`` (default ``sgd,eva``) run under
``jax.profiler.trace`` into ``DIR/<workload>/<optimizer>``; the trace is read back with
``jax.profiler.ProfileData`` and the device time per step is summarised: by kind of
operation and the top operations (the device's "XLA Ops" line on a GPU, its kernel
streams otherwise, the XLA:CPU threads on a CPU).

State memory. ``eva_optax.state_bytes(tx, params)`` of every optimizer (from
shapes, nothing allocated), in MB (10^6 bytes) and relative to SGD with
momentum.

``--breakdown`` times three more variants in the same interleaved rounds, to
show where Eva's extra time goes:

- ``sgd-again``: the SGD step a second time (its own compilation and buffers):
  an A/A control, its difference from ``sgd`` is the noise floor of the run;
- ``sgd+capture``: the SGD step with ``eva_optax.value_and_grad`` instead of
  ``jax.value_and_grad`` (the statistics are returned from the step, so XLA
  cannot drop them): the cost of the capture alone;
- ``sgd-grad+eva-update``: ``jax.value_and_grad`` and Eva's ``tx.update`` with
  statistics passed in as an argument (captured once beforehand): the cost of
  Eva's update alone.

It also prints XLA's static cost analysis of every compiled step (FLOPs and
bytes accessed) and the compile times: numbers that do not depend on the load
of the machine.

Output: a text table, a markdown table per workload (optimizer | ms/step |
xSGD | state MB | xSGD state; with ``--ops`` the op-count table too), and unless
``--quick`` the JSON (with machine info, ``examples.harness.report.machine_info``) and
markdown written to ``benchmarks/results/step_time.{json,md}`` (``step_time_ops.{json,md}`` with
``--ops-only``; ``--json`` / ``--md`` change the paths, ``--no-save`` writes nothing).

Usage::

    python -m benchmarks.step_time                       # the three small ones (make bench)
    python -m benchmarks.step_time --quick               # smoke test, ~1 minute
    python -m benchmarks.step_time --workloads autoencoder --optimizers sgd,eva
    python -m benchmarks.step_time --breakdown --json step_time.json
    python -m benchmarks.step_time --ops-only --no-save  # op counts, nothing timed
    python -m benchmarks.step_time --ops --workloads resnet18,gpt-bf16   # on a GPU
    python -m benchmarks.step_time --ops-only --tiny --workloads resnet18,gpt --no-save

This module is the command line. The workloads are in ``benchmarks/workloads.py``, the
compiling, counting, timing and profiling in ``benchmarks/step_time_measure.py``, the tables
and files in ``benchmarks/step_time_tables.py``; the op counts and XLA's cost come from
``examples/harness/compiled_ops.py``, the trace reading from ``examples/harness/traces.py``.
"""

from __future__ import annotations

import os

# On the CPU backend, JAX's eigh (Shampoo's roots) calls OpenBLAS's LAPACK;
# with several OpenBLAS threads on a busy 2-core machine one batched eigh of
# 56 matrices of 128 x 128 took 10 s instead of 0.08 s. One OpenBLAS thread
# avoids that (set before numpy and jax are imported; an explicit setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import optax

from benchmarks.step_time_measure import (
  ALIASES,
  ALL_OPTIMIZERS,
  DEFAULT_OPTIMIZERS,
  OPTIONS,
  bench_workload,
)
from benchmarks.step_time_tables import device_text, merge_results, print_tables, write_outputs
from benchmarks.workloads import DEFAULT_WORKLOADS, WORKLOADS

from examples.harness import report

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_JSON = os.path.join(RESULTS_DIR, "step_time.json")
DEFAULT_MD = os.path.join(RESULTS_DIR, "step_time.md")
DEFAULT_OPS_JSON = os.path.join(RESULTS_DIR, "step_time_ops.json")  # --ops-only's
DEFAULT_OPS_MD = os.path.join(RESULTS_DIR, "step_time_ops.md")


def _names(text: str, known: Sequence[str], aliases: dict[str, str]) -> tuple[list[str], list[str]]:
  names = [aliases.get(s.strip(), s.strip()) for s in text.split(",") if s.strip()]
  return list(dict.fromkeys(names)), [n for n in names if n not in known]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.step_time",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--workloads",
    default=None,
    help=f"comma-separated subset of {','.join(WORKLOADS)}, or all (default:"
    f" {','.join(DEFAULT_WORKLOADS)}; autoencoder with --quick)",
  )
  p.add_argument(
    "--optimizers",
    default=",".join(DEFAULT_OPTIMIZERS),
    help="comma-separated subset of "
    + ",".join(ALL_OPTIMIZERS)
    + " (default: all; sgd, the reference, is always added)",
  )
  p.add_argument(
    "--rounds", type=int, default=None, help="timed rounds (default 6; 3 with --quick)"
  )
  p.add_argument(
    "--steps-per-round",
    type=int,
    default=None,
    help="steps per optimizer per round (default 3; 1 with --quick); K-FAC, FOOF"
    " and Shampoo run this rounded up to whole periods",
  )
  p.add_argument(
    "--warmup",
    type=int,
    default=None,
    help="untimed steps per variant after compilation (default 2; 0 with --quick)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke test: autoencoder only, 3 rounds x 1 step (periodic optimizers"
    " still a whole period), no warmup, writes no files unless --json/--md",
  )
  p.add_argument(
    "--tiny",
    action="store_true",
    help="shrink the GPU-sized workloads (resnet18*: channels / 8, batch 4; gpt*: 2"
    " layers, d_model 64, seq 32, batch 2, vocab 512) to check their code on a CPU",
  )
  p.add_argument(
    "--ops",
    action="store_true",
    help="also count the top-level ops of every compiled step (table, JSON, markdown)",
  )
  p.add_argument(
    "--ops-only",
    action="store_true",
    help="compile every step from abstract shapes and count its ops; time nothing",
  )
  p.add_argument(
    "--merge",
    nargs="+",
    metavar="JSON",
    default=None,
    help="print (and with --json/--md write) the tables of these runs' JSON files as"
    " one; runs nothing",
  )
  p.add_argument(
    "--profile",
    metavar="DIR",
    default=None,
    help="after timing, trace --profile-steps steps of --profile-optimizers with"
    " jax.profiler into DIR and print the device time per step by operation",
  )
  p.add_argument("--profile-optimizers", default="sgd,eva")
  p.add_argument("--profile-steps", type=int, default=10)
  p.add_argument(
    "--json",
    metavar="PATH",
    default=None,
    help="write the results and machine info here (default"
    " benchmarks/results/step_time.json, step_time_ops.json with --ops-only, none"
    " with --quick)",
  )
  p.add_argument(
    "--md",
    metavar="PATH",
    default=None,
    help="write the markdown tables here (default benchmarks/results/step_time.md,"
    " step_time_ops.md with --ops-only, none with --quick)",
  )
  p.add_argument("--no-save", action="store_true", help="write no files")
  p.add_argument("--markdown", action="store_true", help="also print the markdown tables")
  p.add_argument(
    "--breakdown",
    action="store_true",
    help="also time SGD again (noise floor), SGD with Eva's capture, and Eva's"
    " update without the capture",
  )
  args = p.parse_args(argv)
  q = args.quick
  if args.workloads is None:
    args.workloads = "autoencoder" if q else ",".join(DEFAULT_WORKLOADS)
  if args.rounds is None:
    args.rounds = 3 if q else 6
  if args.steps_per_round is None:
    args.steps_per_round = 1 if q else 3
  if args.warmup is None:
    args.warmup = 0 if q else 2
  if args.no_save:
    args.json = args.md = None
  elif not q and not args.merge:
    args.json = args.json or (DEFAULT_OPS_JSON if args.ops_only else DEFAULT_JSON)
    args.md = args.md or (DEFAULT_OPS_MD if args.ops_only else DEFAULT_MD)
  args.ops = args.ops or args.ops_only
  names, unknown = _names(
    ",".join(WORKLOADS) if args.workloads == "all" else args.workloads, list(WORKLOADS), {}
  )
  if unknown or not names:
    p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}, all")
  opts, unknown = _names(args.optimizers, ALL_OPTIMIZERS, ALIASES)
  if unknown:
    p.error(f"unknown optimizers {unknown}; choose from {', '.join(ALL_OPTIMIZERS)}")
  profiled, unknown = _names(args.profile_optimizers, ALL_OPTIMIZERS, ALIASES)
  if unknown:
    p.error(f"--profile-optimizers: unknown {unknown}")
  opts = ["sgd"] + [o for o in opts if o != "sgd"]
  if args.rounds < 1 or args.steps_per_round < 1 or args.warmup < 0 or args.profile_steps < 1:
    p.error("--rounds, --steps-per-round and --profile-steps must be >= 1, --warmup >= 0")
  if args.profile and args.ops_only:
    p.error("--profile needs timed steps; drop --ops-only")
  args.workload_names = names
  args.optimizer_names = opts
  args.profile_names = profiled
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.merge:
    payloads = []
    for path in args.merge:
      with open(path) as f:
        payloads.append(json.load(f))
    results = merge_results(payloads)
    args.rounds = args.steps_per_round = None  # per workload, in its table's heading
    args.ops = any(payload["settings"].get("ops") for payload in payloads)
    info = payloads[0]["machine"]
    total_s = sum(payload.get("total_s", 0.0) for payload in payloads)
    write_outputs(args, argv, info, results, total_s)
    print_tables(args, results)
    return results

  info = report.machine_info()
  print(
    f"Optimizer step time (SGD momentum {OPTIONS.momentum}, weight decay"
    f" {OPTIONS.weight_decay}) on {device_text(info)}; jax {jax.__version__}, optax"
    f" {optax.__version__}, flax {flax.__version__}"
  )
  if args.ops_only:
    print(f"Op counts only (nothing timed): {', '.join(args.optimizer_names)}.")
  else:
    print(
      "Synthetic random data (step time only). "
      f"{args.rounds} rounds x {args.steps_per_round} steps per optimizer (whole"
      f" periods for K-FAC/FOOF/Shampoo), interleaved: {', '.join(args.optimizer_names)}."
    )
  profile = None
  if args.profile:
    profile = {
      "directory": args.profile,
      "optimizers": args.profile_names,
      "steps": args.profile_steps,
    }
  key = jax.random.PRNGKey(args.seed)
  results: dict[str, Any] = {}
  t_start = time.perf_counter()
  for name in args.workload_names:
    key, k_data, k_init = jax.random.split(key, 3)
    w = WORKLOADS[name](k_data, args.tiny)
    print(f"\n{name}: {w.description}", flush=True)
    results[name] = bench_workload(
      w,
      args.rounds,
      args.steps_per_round,
      args.warmup,
      args.breakdown,
      args.optimizer_names,
      key=k_init,
      timed=not args.ops_only,
      profile=profile,
    )
  total_s = time.perf_counter() - t_start
  write_outputs(args, argv, info, results, total_s)
  print(f"\nTotal benchmark time {total_s:.0f}s. Synthetic random data (step time only).")
  print_tables(args, results)
  return results


if __name__ == "__main__":
  main()
