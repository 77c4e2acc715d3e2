"""The step-time benchmark's measurements: every optimizer of the examples' registry built for
a workload, its training step compiled (op counts and XLA's cost from the compiled object),
timed in interleaved rounds, and optionally traced with ``jax.profiler``.

The method (rounds, whole periods, the ``--breakdown`` variants) is described in
``benchmarks/step_time.py``'s docstring.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import inspect
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax
from benchmarks.workloads import Workload
from examples.harness import compiled_ops, traces, training
from examples.harness.optimizers import SPEC_BY_KEY, Options, Spec

OPTIONS = Options()  # momentum 0.9, weight decay 5e-4, each optimizer's damping and KL clip


# ---------------------------------------------------------------------------
# Optimizers: the examples' registry.

# Sophia is not timed here yet: its periodic work (a Hessian-vector product every
# ``update_interval`` steps) is not one of the periods ``period_of`` reads.
NOT_TIMED = ("sophia",)
ALL_OPTIMIZERS = tuple(k for k in SPEC_BY_KEY if k not in NOT_TIMED)
DEFAULT_OPTIMIZERS = ALL_OPTIMIZERS
ALIASES = {"eva_foof": "eva-f", "eva_shampoo": "eva-s"}  # this script's former keys


def period_of(spec: Spec) -> int:
  """Steps after which a periodic optimizer's work repeats (1: none): the least common
  multiple of its ``stats_every`` and ``inverse_every`` (given, or the defaults)."""
  given = dict(spec.extra)
  periods = [
    given.get(name, p.default)
    for name, p in inspect.signature(spec.factory).parameters.items()
    if name in ("stats_every", "inverse_every")
  ]
  return math.lcm(*(int(p) for p in periods)) if periods else 1


def abstract_stats(w: Workload, params: Any, state: Any) -> Any:
  """The statistics tree of an abstract capture pass (``jax.eval_shape``)."""
  grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True)
  return jax.eval_shape(grad_fn, params, state, w.batch)[2]


def count_layers(stats: Any) -> int:
  """The layers a capture preconditions: its ``LayerStats`` entries."""
  is_entry = lambda x: isinstance(x, eva_optax.LayerStats)
  return sum(is_entry(x) for x in jax.tree.leaves(stats, is_leaf=is_entry))


def count_matrices(params: Any) -> int:
  """Parameters of rank >= 2 (what the plain-gradient preconditioners see)."""
  return sum(jnp.ndim(x) >= 2 for x in jax.tree.leaves(params))


def build_tx(spec: Spec, w: Workload, layouts: Any) -> optax.GradientTransformation:
  """``spec`` at the workload's learning rate; ``layouts=`` where the examples pass it."""
  kwargs = {}
  if spec.statistics is not None and spec.accepts("layouts"):
    kwargs["layouts"] = layouts
  return spec.build(w.learning_rate, OPTIONS, **kwargs)


# ---------------------------------------------------------------------------
# Step functions, in the examples' form: ``step(params, model_state, opt_state, batch,
# *extra) -> (params, model_state, opt_state, loss, metrics)``, the first three donated.


def _jit(step: Callable) -> Callable:
  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_sgd_capture_step(w: Workload, tx: optax.GradientTransformation) -> Callable:
  """SGD with Eva's capture; the stats are an output so that XLA keeps them."""
  grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True)

  def step(params, model_state, opt_state, batch):
    (loss, (model_state, _)), grads, stats = grad_fn(params, model_state, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_state, opt_state, loss, stats

  return _jit(step)


def make_eva_update_step(w: Workload, tx: optax.GradientTransformationExtraArgs) -> Callable:
  """``jax.value_and_grad`` and Eva's update, the statistics an extra input."""

  def step(params, model_state, opt_state, batch, stats):
    (loss, (model_state, metrics)), grads = jax.value_and_grad(w.loss_fn, has_aux=True)(
      params, model_state, batch
    )
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), model_state, opt_state, loss, metrics

  return _jit(step)


# ---------------------------------------------------------------------------
# Compiling, counting and timing.


def _copy(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@dataclasses.dataclass
class Runner:
  """One variant: its compiled step and its own (donated) buffers."""

  name: str
  compiled: Any
  extra: tuple
  params: Any
  opt_state: Any
  state: Any
  compile_s: float = 0.0
  cost: dict[str, float] = dataclasses.field(default_factory=dict)
  ops: dict[str, Any] = dataclasses.field(default_factory=dict)
  first_step_s: float = 0.0
  period: int = 1
  state_bytes: int = 0
  per_step_s: list[float] = dataclasses.field(default_factory=list)
  cpu_per_step_s: list[float] = dataclasses.field(default_factory=list)

  def steps_per_round(self, k: int) -> int:
    """``k`` rounded up to whole periods: ``ceil(k / period) * period``."""
    return -(-k // self.period) * self.period

  def run(self, batch: Any, n: int) -> Any:
    loss = None
    for _ in range(n):
      self.params, self.state, self.opt_state, loss, _ = self.compiled(
        self.params, self.state, self.opt_state, batch, *self.extra
      )
    return loss

  def time(self, batch: Any, n: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step over ``n`` steps."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = self.run(batch, n)
    jax.block_until_ready((self.params, self.opt_state, self.state, out))
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


@dataclasses.dataclass
class Variant:
  """What to compile: a jitted step, its transformation, extra inputs and period."""

  name: str
  step: Callable
  tx: optax.GradientTransformation
  extra: tuple = ()
  period: int = 1
  captures: bool = False  # its step captures statistics (its layers: the captured ones)


def build_runners(
  w: Workload,
  optimizers: Sequence[str],
  breakdown: bool,
  key: jax.Array,
  execute: bool = True,
) -> tuple[list[Runner], dict[str, str], dict[str, int]]:
  """The compiled runners, each optimizer's build error, and the layer counts.

  ``execute=False``: compile from abstract shapes only (``jax.eval_shape`` of the
  parameters and optimizer states), for op counts; nothing is allocated or run.
  """
  if execute:
    params, state = w.init(key)
  else:
    params, state = jax.eval_shape(w.init, key)
  stats = abstract_stats(w, params, state)
  layouts = eva_optax.layouts_of(stats)
  layers = {"captured": count_layers(stats), "matrices": count_matrices(params)}
  variants: list[Variant] = []
  errors: dict[str, str] = {}
  for name in optimizers:
    spec = SPEC_BY_KEY[name]
    try:
      tx = build_tx(spec, w, layouts)
      step = training.make_step(spec, tx, w.loss_fn)
    except Exception as e:  # report, and go on with the others
      if name == "sgd":
        raise
      errors[name] = f"{type(e).__name__}: {e}"
      continue
    captures = bool(eva_optax.statistics_needed(jax.eval_shape(tx.init, params)))
    variants.append(Variant(name, step, tx, (), period_of(spec), captures))
    if name == "sgd" and breakdown:
      eva = build_tx(SPEC_BY_KEY["eva"], w, layouts)
      if execute:
        grad_fn = jax.jit(eva_optax.value_and_grad(w.loss_fn, has_aux=True))
        captured = jax.block_until_ready(grad_fn(params, state, w.batch)[2])
      else:
        captured = stats
      variants += [
        Variant("sgd-again", training.make_step(spec, tx, w.loss_fn), tx),
        Variant("sgd+capture", make_sgd_capture_step(w, tx), tx, (), 1, True),
        Variant(
          "sgd-grad+eva-update",
          make_eva_update_step(w, eva),
          eva,
          (captured,),
          1,
          True,
        ),
      ]
  runners = []
  for v in variants:
    try:
      if execute:
        p, s = _copy(params), _copy(state)
        o = v.tx.init(p)
      else:
        p, s, o = params, state, jax.eval_shape(v.tx.init, params)
      nbytes = int(eva_optax.state_bytes(v.tx, params))
      t0 = time.perf_counter()
      compiled = v.step.lower(p, s, o, w.batch, *v.extra).compile()
      compile_s = time.perf_counter() - t0
      runner = Runner(
        v.name,
        compiled,
        v.extra,
        p,
        o,
        s,
        compile_s,
        cost=compiled_ops.xla_cost(compiled),
        ops=compiled_ops.op_summary(compiled),
        period=v.period,
        state_bytes=nbytes,
      )
      runner.ops["layers"] = layers["captured" if v.captures else "matrices"]
      if execute:
        t0 = time.perf_counter()
        jax.block_until_ready(runner.run(w.batch, 1))
        runner.first_step_s = time.perf_counter() - t0
    except Exception as e:
      if v.name == "sgd":
        raise
      errors[v.name] = f"{type(e).__name__}: {e}"
      print(f"  {v.name} FAILED: {errors[v.name]}", flush=True)
      continue
    runners.append(runner)
    first = f", first step {runner.first_step_s:.2f}s" if execute else ""
    print(
      f"  {v.name}: compiled in {compile_s:.1f}s{first}, {runner.ops['total']} ops",
      flush=True,
    )
  return runners, errors, layers


def _summary(wall: Sequence[float], cpu: Sequence[float]) -> dict[str, Any]:
  q25, q75 = np.percentile(np.asarray(wall), [25, 75])
  return {
    "median_ms": 1e3 * statistics.median(wall),
    "q25_ms": 1e3 * float(q25),
    "q75_ms": 1e3 * float(q75),
    "min_ms": 1e3 * min(wall),
    "cpu_median_ms": 1e3 * statistics.median(cpu),
    "per_step_ms_by_round": [1e3 * t for t in wall],
    "cpu_per_step_ms_by_round": [1e3 * t for t in cpu],
  }


def ops_summary(ops: dict[str, Any], sgd_ops: dict[str, Any]) -> dict[str, Any]:
  """A variant's op counts with their ratio to SGD's and the extra ops per layer."""
  extra = ops["total"] - sgd_ops["total"]
  return {
    **ops,
    "over_sgd": ops["total"] / sgd_ops["total"] if sgd_ops["total"] else float("nan"),
    "extra": extra,
    "extra_per_layer": extra / ops["layers"] if ops["layers"] else float("nan"),
  }


def bench_workload(
  w: Workload,
  rounds: int,
  steps: int,
  warmup: int,
  breakdown: bool,
  optimizers: Sequence[str] = ALL_OPTIMIZERS,
  key: jax.Array | None = None,
  timed: bool = True,
  profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Compile every variant, count its ops and (``timed``) time it in rounds."""
  key = jax.random.PRNGKey(0) if key is None else key
  runners, errors, layers = build_runners(w, optimizers, breakdown, key, execute=timed)
  if timed:
    for r in runners:  # a few more untimed steps (caches, allocator)
      jax.block_until_ready(r.run(w.batch, warmup))
    for i in range(rounds):
      for r in runners:
        wall, cpu = r.time(w.batch, r.steps_per_round(steps))
        r.per_step_s.append(wall)
        r.cpu_per_step_s.append(cpu)
      line = "  ".join(f"{r.name} {1e3 * r.per_step_s[-1]:.1f}" for r in runners)
      print(f"  round {i + 1:2d}/{rounds}: {line} ms/step", flush=True)
  sgd = runners[0]
  variants: dict[str, dict[str, Any]] = {}
  for r in runners:
    v = {
      "steps_per_round": r.steps_per_round(steps),
      "period": r.period,
      "state_bytes": r.state_bytes,
      "state_mb": r.state_bytes / 1e6,
      "state_over_sgd": (r.state_bytes / sgd.state_bytes if sgd.state_bytes else float("nan")),
      "compile_s": r.compile_s,
      "xla_cost": r.cost,
      "ops": ops_summary(r.ops, sgd.ops),
    }
    if timed:
      v.update(_summary(r.per_step_s, r.cpu_per_step_s), first_step_s=r.first_step_s)
    variants[r.name] = v
  out = {
    "description": w.description,
    "num_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(sgd.params))),
    "layers": layers,
    "timed": timed,
    "variants": variants,
    "errors": errors,
  }
  if timed:
    base = variants["sgd"]
    for r in runners:
      v = variants[r.name]
      v["over_sgd"] = v["median_ms"] / base["median_ms"]
      v["extra_ms"] = v["median_ms"] - base["median_ms"]
      v["paired_over_sgd"] = statistics.median(a / b for a, b in zip(r.per_step_s, sgd.per_step_s))
      v["min_over_sgd"] = v["min_ms"] / base["min_ms"]
      v["cpu_over_sgd"] = v["cpu_median_ms"] / base["cpu_median_ms"]
      v["cpu_extra_ms"] = v["cpu_median_ms"] - base["cpu_median_ms"]
    out.update(rounds=rounds, steps_per_round=steps, sgd_ms=base["median_ms"])
    out["relative_iqr"] = max(
      (v["q75_ms"] - v["q25_ms"]) / v["median_ms"] for v in variants.values()
    )
    if "eva" in variants:
      eva = variants["eva"]
      out.update(
        {
          "eva_ms": eva["median_ms"],
          "eva_over_sgd": eva["over_sgd"],
          "eva_over_sgd_paired_median": eva["paired_over_sgd"],
          "eva_over_sgd_min": eva["min_over_sgd"],
          "eva_over_sgd_cpu": eva["cpu_over_sgd"],
        }
      )
    if profile:
      out["profile"] = profile_runners(w, runners, **profile)
  return out


def profile_runners(
  w: Workload,
  runners: Sequence[Runner],
  directory: str,
  optimizers: Sequence[str],
  steps: int,
  top: int = 12,
) -> dict[str, Any]:
  """Trace ``steps`` (whole periods) of each runner named in ``optimizers``; summarise."""
  out: dict[str, Any] = {}
  for r in runners:
    if r.name not in optimizers:
      continue
    n = r.steps_per_round(steps)
    where = os.path.join(directory, w.name, r.name)
    jax.block_until_ready(r.run(w.batch, 1))
    with jax.profiler.trace(where):
      jax.block_until_ready(r.run(w.batch, n))
    files = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True))
    if not files:
      out[r.name] = {"error": f"no .xplane.pb under {where}"}
      continue
    kinds = traces.instruction_kinds(r.compiled)
    try:
      source, events = traces.trace_events(files[-1], kinds)
    except Exception as e:  # a trace this jax cannot read
      out[r.name] = {"error": f"{type(e).__name__}: {e}", "trace": files[-1]}
      continue
    total = collections.Counter()
    calls = collections.Counter()
    by_kind = collections.Counter()
    for name, ns in events:
      total[name] += ns
      calls[name] += 1
      by_kind[kinds.get(name, "(not an entry op)")] += ns
    busy = sum(total.values())
    out[r.name] = {
      "trace": files[-1],
      "source": source,
      "steps": n,
      "busy_us_per_step": busy / 1e3 / n,
      "by_kind_us_per_step": {k: ns / 1e3 / n for k, ns in by_kind.most_common()},
      "top": [
        {
          "name": name,
          "kind": kinds.get(name, ""),
          "calls_per_step": calls[name] / n,
          "us_per_step": ns / 1e3 / n,
          "share": ns / busy if busy else float("nan"),
        }
        for name, ns in total.most_common(top)
      ],
    }
  return out
