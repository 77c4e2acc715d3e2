"""Step time of SGD and Eva, data-parallel over 1, 2, 4 and 8 devices (Eva / SGD per device count).

The workload is the CNN of ``examples/multi_device.py`` (Conv 32 -> pool -> Conv 64 -> pool
-> Dense 128 -> Dense 10, cross-entropy) at a fixed *global* batch (default 256) of
synthetic data, with that example's training steps: ``jax.jit`` over a one-axis mesh, the
batch sharded over ``'data'``, parameters and optimizer state replicated and donated.

- ``sgd``: ``jax.value_and_grad`` and
  ``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))``;
- ``eva``: ``eva_optax.value_and_grad`` and ``eva_optax.eva(lr, momentum=0.9, weight_decay=5e-4)``;
- ``sgd-again``: the SGD step compiled a second time, with its own buffers: an A/A control
  whose ratio to ``sgd`` is the noise floor of the run.

Every device count runs in its own worker process (the number of CPU devices is fixed by
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts). The workers are
started once, compile their three steps and run ``--warmup`` untimed steps; then, in each of
``--rounds`` rounds, the driver asks every worker in turn (one at a time, the others idle)
to time ``--steps`` consecutive steps of each optimizer, in an order rotated from round to
round. So every device count and optimizer sees the same machine conditions, round by
round. Reported per device count: the median over rounds of the wall time per step, the
ratio Eva/SGD of the medians, the median of the per-round (paired) ratios, the ratio of the
median process CPU times per step, the A/A control, and XLA's static cost analysis of the
compiled steps (FLOPs and bytes accessed per device program), which does not depend on the
load of the machine.

On a CPU the N "devices" are N XLA devices of one process sharing the same cores (here 2):
N devices do not compute N times faster, and the absolute times say little about a real
multi-device machine. The point is the ratio Eva/SGD: under ``jit`` with a sharded batch
Eva's statistics (O(in + out) numbers per layer) are global means without any code, and
XLA's all-reduce combiner puts them into the same single all-reduce as SGD's gradients (the
table counts the all-reduces and the floats they carry), so the ratio should stay flat as
devices are added.

Output: a table on stdout and, unless ``--no-save`` (or ``--quick``),
``benchmarks/results/multi_device.{json,md}`` (``--json`` / ``--md`` change the paths) with
the machine description and versions.

Usage::

    python -m benchmarks.multi_device                  # 1, 2, 4, 8 devices, results saved
    python -m benchmarks.multi_device --quick          # smoke test, nothing saved
    python -m benchmarks.multi_device --device-counts 1,8 --rounds 20 --steps 3
"""

from __future__ import annotations

import os

# As in benchmarks/step_time.py: one OpenBLAS thread (set before numpy and jax are imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.records import save_report
from examples.harness import compiled_ops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPTIMIZERS = ("sgd", "eva", "sgd-again")
REPLY = "RESULT "  # prefix of the worker's answer lines on stdout
DEVICE_FLAG = "--xla_force_host_platform_device_count"


# ---------------------------------------------------------------------------
# Worker: one process, one device count.


def _load_example() -> Any:
  """The example ``examples/multi_device.py`` (imported in the worker, after its XLA_FLAGS)."""
  return importlib.import_module("examples.multi_device")


def _collectives(compiled: Any) -> dict[str, int]:
  """Number of all-reduce instructions in the compiled step and the elements they carry
  (``examples.harness.compiled_ops.collectives``)."""
  found = [c for c in compiled_ops.collectives(compiled) if c.kind == "all-reduce"]
  return {"all_reduces": len(found), "all_reduced_elements": sum(c.elements for c in found)}


def _reply(message: dict[str, Any]) -> None:
  print(REPLY + json.dumps(message), flush=True)


def worker(devices: int, batch_size: int, warmup: int, seed: int) -> None:
  """Compile the steps, then time them on request: one JSON line per request on stdout.

  Requests on stdin: a comma-separated list of optimizers and a step count
  (``"eva,sgd,sgd-again 5"``); ``"quit"`` ends the worker.
  """
  import jax
  import numpy as np

  example = _load_example()
  if jax.device_count() < devices:
    raise SystemExit(f"worker: {jax.device_count()} devices, {devices} wanted")
  mesh = example.make_mesh(jax.devices()[:devices])
  sharding = example.data_sharding(mesh)
  rng = np.random.default_rng(seed)
  images = jax.device_put(
    rng.standard_normal((batch_size, *example.IMAGE_SHAPE)).astype(np.float32), sharding
  )
  labels = jax.device_put(
    rng.integers(0, example.NUM_CLASSES, (batch_size,)).astype(np.int32), sharding
  )

  runners: dict[str, list[Any]] = {}
  info: dict[str, Any] = {"devices": devices, "compile_s": {}, "cost": {}, "collectives": {}}
  for name in OPTIMIZERS:
    kind = name.split("-")[0]
    tx = example.make_optimizer(kind, example.DEFAULT_LR[kind])
    params, opt_state = example.init_state(mesh, tx, seed)
    t0 = time.perf_counter()
    step = (
      example.make_train_step(kind, tx, mesh).lower(params, opt_state, images, labels).compile()
    )
    info["compile_s"][name] = time.perf_counter() - t0
    info["cost"][name] = compiled_ops.xla_cost(step)
    info["collectives"][name] = _collectives(step)
    for _ in range(1 + warmup):
      params, opt_state, loss = step(params, opt_state, images, labels)
    jax.block_until_ready(loss)
    runners[name] = [step, params, opt_state]
  info["loss_after_warmup"] = float(loss)
  info["platform"] = jax.devices()[0].platform
  _reply(info)

  for line in sys.stdin:
    request = line.split()
    if not request or request[0] == "quit":
      break
    names, steps = request[0].split(","), int(request[1])
    times = {}
    for name in names:
      step, params, opt_state = runners[name]
      c0, t0 = time.process_time(), time.perf_counter()
      for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, images, labels)
      jax.block_until_ready((params, opt_state, loss))
      times[name] = {
        "wall_ms": 1e3 * (time.perf_counter() - t0) / steps,
        "cpu_ms": 1e3 * (time.process_time() - c0) / steps,
      }
      runners[name][1:] = [params, opt_state]
    _reply(times)


# ---------------------------------------------------------------------------
# Driver: one worker per device count, interleaved rounds.


class Worker:
  """A worker subprocess with ``devices`` CPU devices."""

  def __init__(self, devices: int, args: argparse.Namespace):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env = {
      **os.environ,
      "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"]),
      "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
      "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
      sys.executable,
      "-m",
      "benchmarks.multi_device",
      "--worker",
      str(devices),
      "--batch-size",
      str(args.batch_size),
      "--warmup",
      str(args.warmup),
      "--seed",
      str(args.seed),
    ]
    self.devices = devices
    self.process = subprocess.Popen(
      command, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    self.info: dict[str, Any] = {}

  def read(self) -> dict[str, Any]:
    for line in self.process.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY) :])
    raise RuntimeError(f"worker with {self.devices} devices exited (status {self.process.wait()})")

  def request(self, names: Sequence[str], steps: int) -> dict[str, Any]:
    self.process.stdin.write(f"{','.join(names)} {steps}\n")
    self.process.stdin.flush()
    return self.read()

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()


def _rotate(items: Sequence[Any], k: int) -> list[Any]:
  k %= len(items)
  return [*items[k:], *items[:k]]


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
  if len(values) < 2:
    return values[0], values[0]
  q = statistics.quantiles(values, n=4)
  return q[0], q[2]


def summarise(rounds: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
  """Medians and ratios for one device count from its per-round timings."""
  wall = {n: [r[n]["wall_ms"] for r in rounds] for n in OPTIMIZERS}
  cpu = {n: [r[n]["cpu_ms"] for r in rounds] for n in OPTIMIZERS}
  med = {n: statistics.median(v) for n, v in wall.items()}
  med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
  paired = {
    n: statistics.median(r[n]["wall_ms"] / r["sgd"]["wall_ms"] for r in rounds)
    for n in ("eva", "sgd-again")
  }
  cost = info.get("cost", {})
  flop_ratio = (
    cost["eva"]["gflop"] / cost["sgd"]["gflop"] if cost.get("sgd", {}).get("gflop") else None
  )
  bytes_ratio = (
    cost["eva"]["mb_accessed"] / cost["sgd"]["mb_accessed"]
    if cost.get("sgd", {}).get("mb_accessed")
    else None
  )
  return {
    "devices": info["devices"],
    "median_wall_ms": med,
    "median_cpu_ms": med_cpu,
    "wall_iqr_ms": {n: _quartiles(v) for n, v in wall.items()},
    "eva_over_sgd": med["eva"] / med["sgd"],
    "eva_over_sgd_paired": paired["eva"],
    "eva_over_sgd_cpu": med_cpu["eva"] / med_cpu["sgd"],
    "sgd_again_over_sgd": med["sgd-again"] / med["sgd"],
    "sgd_again_over_sgd_paired": paired["sgd-again"],
    "eva_over_sgd_flops": flop_ratio,
    "eva_over_sgd_bytes": bytes_ratio,
    "cost": cost,
    "collectives": info.get("collectives", {}),
    "compile_s": info.get("compile_s", {}),
    "rounds": rounds,
  }


def machine_info() -> dict[str, Any]:
  """``examples.harness.report.machine_info`` without the devices: the driver runs on the CPU
  and leaves JAX's backend alone, the device counts are the workers'."""
  from examples.harness import report

  return report.machine_info(devices=False)


def text_table(results: Sequence[dict[str, Any]]) -> str:
  header = (
    f"{'devices':>7} {'SGD ms':>8} {'Eva ms':>8} {'Eva/SGD':>8} {'paired':>7} "
    f"{'CPU':>6} {'A/A':>6} {'FLOPs':>6} {'bytes':>6} {'all-reduces':>11} {'floats':>17}"
  )
  lines = [header, "-" * len(header)]
  for r in results:
    lines.append(
      f"{r['devices']:>7} {r['median_wall_ms']['sgd']:>8.1f} "
      f"{r['median_wall_ms']['eva']:>8.1f} {r['eva_over_sgd']:>8.3f} "
      f"{r['eva_over_sgd_paired']:>7.3f} {r['eva_over_sgd_cpu']:>6.3f} "
      f"{r['sgd_again_over_sgd']:>6.3f} {_fmt(r['eva_over_sgd_flops'])} "
      f"{_fmt(r['eva_over_sgd_bytes'])} {_pair(r, 'all_reduces'):>11} "
      f"{_pair(r, 'all_reduced_elements'):>17}"
    )
  return "\n".join(lines)


def _pair(result: dict[str, Any], key: str) -> str:
  """``SGD / Eva`` of a collectives count."""
  c = result["collectives"]
  return f"{c['sgd'][key]} / {c['eva'][key]}" if "sgd" in c and "eva" in c else "-"


def _fmt(x: float | None) -> str:
  return f"{x:>6.3f}" if x is not None else f"{'-':>6}"


def markdown(report: dict[str, Any]) -> str:
  m, a = report["machine"], report["settings"]
  v = m["versions"]
  lines = [
    "# Data-parallel step time: Eva / SGD over 1-8 devices",
    "",
    f"`python -m benchmarks.multi_device` on {m['cpu'] or m['machine']} "
    f"({m['usable_cpus']} usable of {m['cpu_count']} CPUs), jax {v['jax']}, "
    f"jaxlib {v['jaxlib']}, optax {v['optax']}, flax {v['flax']}, "
    f"eva_optax {v['eva_optax']}, Python {m['python']}. The CNN of "
    "`examples/multi_device.py` (Conv 32 -> pool -> Conv 64 -> pool -> Dense 128 -> "
    f"Dense 10), global batch {a['batch_size']} of synthetic data sharded over the "
    "devices with `jax.jit` + `NamedSharding`, parameters and optimizer state "
    "replicated. Each device count in its own process "
    "(`XLA_FLAGS=--xla_force_host_platform_device_count=N`); "
    f"{a['rounds']} interleaved rounds x {a['steps']} steps per optimizer, all device "
    "counts and optimizers timed in turn in every round. Load average "
    f"{report['load_average_start'][0]:.1f} at the start, "
    f"{report['load_average_end'][0]:.1f} at the end; total {report['total_s']:.0f} s.",
    "",
    "| devices | SGD ms/step | Eva ms/step | Eva/SGD | Eva/SGD (paired) | Eva/SGD (CPU time) "
    "| A/A (SGD/SGD) | Eva/SGD FLOPs | Eva/SGD bytes | all-reduces SGD / Eva "
    "| floats all-reduced SGD / Eva |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in report["results"]:
    lines.append(
      f"| {r['devices']} | {r['median_wall_ms']['sgd']:.1f} | "
      f"{r['median_wall_ms']['eva']:.1f} | **{r['eva_over_sgd']:.2f}** | "
      f"{r['eva_over_sgd_paired']:.2f} | {r['eva_over_sgd_cpu']:.2f} | "
      f"{r['sgd_again_over_sgd']:.2f} | {_fmt(r['eva_over_sgd_flops']).strip()} | "
      f"{_fmt(r['eva_over_sgd_bytes']).strip()} | {_pair(r, 'all_reduces')} | "
      f"{_pair(r, 'all_reduced_elements')} |"
    )
  lines += [
    "",
    "ms/step: median over rounds of the wall time per step. Eva/SGD: ratio of those "
    "medians; paired: median over rounds of the ratio within the round; CPU time: ratio "
    "of the median process CPU time per step. A/A: the SGD step compiled and timed a "
    "second time, over the first: the noise floor of this run. FLOPs and bytes: XLA's "
    "static cost analysis of the compiled per-device programs (independent of load). "
    "All-reduces: the all-reduce instructions of the compiled step (XLA's combiner merges "
    "the per-tensor reductions into tuples) and the number of floats they carry.",
    "",
    '**Read the ratios, not the times.** The N CPU "devices" are N XLA devices in one '
    f"process sharing the same {m['usable_cpus']} cores: the absolute ms/step show how "
    "XLA's CPU runtime schedules N device programs on those cores, not the speed of N "
    "real devices, and say nothing about scaling. What the table checks is that Eva stays at SGD's cost "
    "as the batch is spread over more devices: under `jit` with a sharded batch Eva's "
    "statistics (ā, ḡ: O(in + out) numbers per layer) are global means that XLA "
    "all-reduces with the gradients (one combined all-reduce for both optimizers, a few "
    "more floats for Eva), with no change to the training step.",
    "",
    "Why the ratio is not exactly flat: the optimizer update runs replicated, on the "
    "full parameters on every device, for SGD as for Eva, while the forward and backward "
    "passes shrink with the per-device batch. Eva adds to SGD a fixed amount of work per "
    "step whatever the batch (its update reads the gradient a few more times: ḡᵀĜā, the "
    "rank-one correction, the KL clip; its capture takes the im2col of each "
    "convolution's mean input image, after the all-reduce). "
    "At a fixed global batch this extra share of each device program grows with the "
    "device count (bytes column), and on this CPU the N device programs run on the same "
    "cores, so the replicated update is also computed N times there. On real devices "
    "each device runs its copy in parallel; only the per-device share (FLOPs and bytes "
    "columns) remains.",
  ]
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.multi_device", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--device-counts", default="1,2,4,8")
  p.add_argument("--batch-size", type=int, default=256, help="global batch size")
  p.add_argument("--rounds", type=int, default=16)
  p.add_argument("--steps", type=int, default=5, help="steps per optimizer per round")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="2 rounds x 2 steps, 1 and 2 devices")
  p.add_argument("--json", default=str(RESULTS / "multi_device.json"))
  p.add_argument("--md", default=str(RESULTS / "multi_device.md"))
  p.add_argument("--no-save", action="store_true")
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.device_counts, args.rounds, args.steps, args.warmup = "1,2", 2, 2, 1
    args.no_save = True
  args.device_counts = [int(n) for n in args.device_counts.split(",") if n.strip()]
  for n in args.device_counts:
    if args.batch_size % n:
      p.error(f"--batch-size {args.batch_size} is not a multiple of {n} devices")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.worker is not None:
    worker(args.worker, args.batch_size, args.warmup, args.seed)
    return None

  start = time.perf_counter()
  load_start = os.getloadavg()
  workers = [Worker(n, args) for n in args.device_counts]
  try:
    for w in workers:  # they compile in parallel; wait for all
      w.info = w.read()
      print(
        f"{w.devices} device(s): compiled in "
        + ", ".join(f"{n} {s:.1f}s" for n, s in w.info["compile_s"].items()),
        flush=True,
      )
    rounds: dict[int, list[dict[str, Any]]] = {w.devices: [] for w in workers}
    for r in range(args.rounds):
      for w in _rotate(workers, r):
        rounds[w.devices].append(w.request(_rotate(OPTIMIZERS, r), args.steps))
      latest = ", ".join(
        f"{n}: {t[-1]['eva']['wall_ms'] / t[-1]['sgd']['wall_ms']:.2f}" for n, t in rounds.items()
      )
      print(f"round {r + 1}/{args.rounds}: Eva/SGD {latest}", flush=True)
  finally:
    for w in workers:
      w.close()

  results = [summarise(rounds[w.devices], w.info) for w in workers]
  report = {
    "benchmark": "multi_device",
    "machine": machine_info(),
    "settings": {
      "device_counts": args.device_counts,
      "batch_size": args.batch_size,
      "rounds": args.rounds,
      "steps": args.steps,
      "warmup": args.warmup,
      "seed": args.seed,
      "optimizers": list(OPTIMIZERS),
    },
    "load_average_start": load_start,
    "load_average_end": os.getloadavg(),
    "total_s": time.perf_counter() - start,
    "results": results,
  }
  print()
  print(text_table(results))
  if not args.no_save:
    print("\n" + save_report(report, args.json, args.md, markdown(report)))
  return report


if __name__ == "__main__":
  main()
