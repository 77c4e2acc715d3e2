"""Step time and optimizer-state size of Eva, its variants and baselines (``make bench``).

Three workloads, each trained with synthetic random data (the numbers are step
times, not accuracies; the data only has to have the right shapes):

- ``autoencoder``: the deep autoencoder of the Eva paper, an MLP
  784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, MSE), batch 1000;
- ``resnet``: a small ResNet-style CNN with BatchNorm (3x3 conv 16 channels, then
  3 stages of 2 residual blocks with 16/32/64 channels and strides 1/2/2, global
  average pooling, Dense 10) on 28x28x1 inputs, batch 128, cross-entropy; the
  BatchNorm ``batch_stats`` are updated through ``has_aux``;
- ``transformer``: a 4-layer pre-LN decoder-only transformer (d_model 256,
  4 heads, MLP 1024, sequence 128, batch 16, vocabulary 256), causal attention
  written by hand with ``nn.DenseGeneral`` q/k/v projections
  (``features=(heads, head_dim)``) and output projection (``axis=(-2, -1)``),
  next-token cross-entropy.

Each optimizer step is one jitted function (gradient, optimizer update,
``optax.apply_updates``) with donated parameter and optimizer-state buffers.
The optimizers (``--optimizers``, default all; ``sgd`` is always timed, it is
the reference), with ``lr`` the workload's learning rate and ``wd`` = 5e-4:

- ``sgd``: ``jax.value_and_grad`` and
  ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))``;
- ``adamw``: ``jax.value_and_grad`` and ``optax.adamw(1e-3, weight_decay=0.05)``;
- ``eva``: ``eva_optax.value_and_grad`` (default statistics) and
  ``eva_optax.eva(lr, momentum=0.9, weight_decay=wd, layouts=...)``;
- ``eva_foof``: ``eva_optax.value_and_grad(..., statistics=EVA_FOOF_STATISTICS)``
  and ``eva_optax.eva_foof(lr, weight_decay=wd, layouts=...)``;
- ``eva_shampoo``: ``jax.value_and_grad`` and ``eva_optax.eva_shampoo(lr,
  weight_decay=wd)`` (no statistics);
- ``kfac``: ``eva_optax.value_and_grad(..., statistics=KFAC_STATISTICS)`` and
  ``eva_optax.kfac(lr, weight_decay=wd, stats_every=10, inverse_every=10,
  layouts=...)``, factors and inverses every 10 steps, the capture gated with
  ``factors_due=eva_optax.factors_due(opt_state)``;
- ``foof``: ``eva_optax.value_and_grad(..., statistics=FOOF_STATISTICS)`` and
  ``eva_optax.foof(lr, weight_decay=wd, inverse_every=50, layouts=...)``;
- ``shampoo``: ``jax.value_and_grad`` and ``eva_optax.shampoo(lr,
  weight_decay=wd, inverse_every=10)``.

``layouts=`` is ``eva_optax.layouts_of`` of the statistics of an abstract pass
(``jax.eval_shape``), the same for every optimizer that takes it: correct for
every layer, including those whose layout cannot be guessed from the shapes.

Timing. Every step is compiled and run once first, then ``--warmup`` more
untimed steps. Then, for each round, every optimizer is timed in turn, back to
back (``block_until_ready`` at the end of each group), so all see the same
machine conditions. An optimizer without a period runs ``k`` =
``--steps-per-round`` steps per round. K-FAC, FOOF and Shampoo recompute their
inverses (or inverse roots) only every ``period`` steps (10, 50, 10), so a
single step, or a median of single steps, would miss that cost: they run
``ceil(k / period) * period`` consecutive steps per round (whole periods, so
each round contains exactly ``n / period`` inverse steps whatever the phase),
and their per-round time is the average per step over those steps. The table
reports, per optimizer, the median over rounds of the wall-clock time per step
and its ratio to SGD. The text table gives three other estimates of the same
ratio (median of the per-round ratios, ratio of the fastest rounds, ratio of
the median process CPU time per step) and the spread of the rounds: on a shared
machine the wall time of a step can change by tens of percent from one second
to the next, and the CPU-time ratio is then the most stable of the four.

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
xSGD | state MB | xSGD state), and unless ``--quick`` the JSON (with machine
info) and markdown written to ``benchmarks/results/step_time.{json,md}``
(``--json`` / ``--md`` change the paths, ``--no-save`` writes nothing).

Usage::

    python benchmarks/step_time.py                       # everything (make bench)
    python benchmarks/step_time.py --quick               # smoke test, ~1 minute
    python benchmarks/step_time.py --workloads autoencoder --optimizers sgd,eva
    python benchmarks/step_time.py --breakdown --json step_time.json
"""

from __future__ import annotations

import os

# On the CPU backend, JAX's eigh (Shampoo's roots) calls OpenBLAS's LAPACK;
# with several OpenBLAS threads on a busy 2-core machine one batched eigh of
# 56 matrices of 128 x 128 took 10 s instead of 0.08 s. One OpenBLAS thread
# avoids that (set before numpy and jax are imported; an explicit setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import eva_optax

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


# ---------------------------------------------------------------------------
# Models: those of the examples (examples/harness/models.py); the transformer
# with its blocks unrolled.

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from harness.models import Autoencoder, CharTransformer, ResNet  # noqa: E402


# ---------------------------------------------------------------------------
# Workloads: a loss ``loss_fn(params, state, batch) -> (loss, new_state)`` with
# ``state`` the non-trained collections (BatchNorm statistics, or {}).


@dataclasses.dataclass
class Workload:
    name: str
    description: str
    loss_fn: Callable[..., tuple[jax.Array, Any]]
    params: Any
    state: Any
    batch: Any
    learning_rate: float


def autoencoder(key: jax.Array) -> Workload:
    model = Autoencoder()
    k_init, k_data = jax.random.split(key)
    batch = jax.random.uniform(k_data, (1000, 784), jnp.float32)
    params = model.init(k_init, batch[:1])["params"]

    def loss_fn(params, state, batch):
        out = model.apply({"params": params}, batch)
        return jnp.mean(jnp.square(out - batch)), state

    return Workload(
        "autoencoder",
        "MLP 784-1000-500-250-30-250-500-1000-784, MSE, batch 1000",
        loss_fn, params, {}, batch, 0.01,
    )


def resnet(key: jax.Array) -> Workload:
    model = ResNet()
    k_init, k_x, k_y = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (128, 28, 28, 1), jnp.float32)
    y = jax.random.randint(k_y, (128,), 0, 10)
    variables = model.init(k_init, x[:2], train=False)

    def loss_fn(params, batch_stats, batch):
        images, labels = batch
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images, train=True, mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    return Workload(
        "resnet",
        "ResNet-style CNN 16/32/64 x2 blocks + BatchNorm, 28x28x1, batch 128",
        loss_fn, variables["params"], variables["batch_stats"], (x, y), 0.05,
    )


def transformer(key: jax.Array) -> Workload:
    model = CharTransformer(vocab=256, d_model=256, mlp_dim=1024, scan=False)
    k_init, k_data = jax.random.split(key)
    tokens = jax.random.randint(k_data, (16, 129), 0, model.vocab)
    params = model.init(k_init, tokens[:1, :-1])["params"]

    def loss_fn(params, state, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return loss.mean(), state

    return Workload(
        "transformer",
        "pre-LN transformer 4x(d256, 4 heads, MLP 1024), seq 128, batch 16, vocab 256",
        loss_fn, params, {}, tokens, 0.01,
    )


WORKLOADS: dict[str, Callable[[jax.Array], Workload]] = {
    "autoencoder": autoencoder,
    "resnet": resnet,
    "transformer": transformer,
}


# ---------------------------------------------------------------------------
# Step functions. Each takes and returns (params, opt_state, state) and returns
# the loss last; params, opt_state and state are donated.


def _jit(step: Callable) -> Callable:
    return jax.jit(step, donate_argnums=(0, 1, 2))


ADAMW_LR = 1e-3
ADAMW_WEIGHT_DECAY = 0.05

ALL_OPTIMIZERS = (
    "sgd", "adamw", "eva", "eva_foof", "eva_shampoo", "kfac", "foof", "shampoo",
)
DEFAULT_OPTIMIZERS = ALL_OPTIMIZERS


def sgd_tx(lr: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(lr, momentum=MOMENTUM)
    )


def workload_layouts(w: Workload) -> Any:
    """``layouts_of`` the statistics of an abstract pass: correct for every layer,
    including those whose layout cannot be guessed from the parameter shapes."""
    grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True)
    stats = jax.eval_shape(grad_fn, w.params, w.state, w.batch)[2]
    return eva_optax.layouts_of(stats)


def eva_tx(w: Workload, lr: float, layouts: Any = None) -> optax.GradientTransformationExtraArgs:
    if layouts is None:
        layouts = workload_layouts(w)
    return eva_optax.eva(
        lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, layouts=layouts,
    )


@dataclasses.dataclass
class OptimizerSpec:
    """An optimizer: its transformation, the statistics its update takes (None:
    plain ``jax.value_and_grad``, no ``stats=``) and its period (1: none)."""

    tx: optax.GradientTransformation
    statistics: tuple[str, ...] | None
    period: int = 1


def optimizer_spec(name: str, w: Workload, layouts: Any) -> OptimizerSpec:
    lr, wd = w.learning_rate, WEIGHT_DECAY
    if name == "sgd":
        return OptimizerSpec(sgd_tx(lr), None)
    if name == "adamw":
        return OptimizerSpec(optax.adamw(ADAMW_LR, weight_decay=ADAMW_WEIGHT_DECAY), None)
    if name == "eva":
        return OptimizerSpec(eva_tx(w, lr, layouts), tuple(eva_optax.EVA_STATISTICS))
    if name == "eva_foof":
        return OptimizerSpec(
            eva_optax.eva_foof(lr, weight_decay=wd, layouts=layouts),
            tuple(eva_optax.EVA_FOOF_STATISTICS),
        )
    if name == "eva_shampoo":
        return OptimizerSpec(eva_optax.eva_shampoo(lr, weight_decay=wd), None)
    if name == "kfac":
        return OptimizerSpec(
            eva_optax.kfac(
                lr, weight_decay=wd, stats_every=10, inverse_every=10, layouts=layouts
            ),
            tuple(eva_optax.KFAC_STATISTICS), 10,
        )
    if name == "foof":
        return OptimizerSpec(
            eva_optax.foof(lr, weight_decay=wd, inverse_every=50, layouts=layouts),
            tuple(eva_optax.FOOF_STATISTICS), 50,
        )
    if name == "shampoo":
        return OptimizerSpec(
            eva_optax.shampoo(lr, weight_decay=wd, inverse_every=10), None, 10
        )
    raise ValueError(f"unknown optimizer {name!r}")


def make_sgd_step(w: Workload, tx: optax.GradientTransformation) -> Callable:
    """``jax.value_and_grad`` and ``tx.update`` without statistics."""

    def step(params, opt_state, state, batch):
        (loss, state), grads = jax.value_and_grad(w.loss_fn, has_aux=True)(
            params, state, batch
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss

    return _jit(step)


def make_eva_step(
    w: Workload,
    tx: optax.GradientTransformationExtraArgs,
    statistics: Sequence[str] | None = None,
) -> Callable:
    """``eva_optax.value_and_grad`` (given statistics) and ``tx.update(stats=)``."""
    kwargs = {} if statistics is None else {"statistics": tuple(statistics)}
    grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True, **kwargs)
    gated = statistics is not None and bool(
        set(statistics) & {eva_optax.capture.INPUT_FACTOR, eva_optax.capture.OUTPUT_GRAD_FACTOR}
    )

    def step(params, opt_state, state, batch):
        due = {"factors_due": eva_optax.factors_due(opt_state)} if gated else {}
        (loss, state), grads, stats = grad_fn(params, state, batch, **due)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, state, loss

    return _jit(step)


def make_step(w: Workload, spec: OptimizerSpec) -> Callable:
    if spec.statistics is None:
        return make_sgd_step(w, spec.tx)
    return make_eva_step(w, spec.tx, spec.statistics)


def make_sgd_capture_step(w: Workload, tx: optax.GradientTransformation) -> Callable:
    """SGD with Eva's capture; the stats are an output so that XLA keeps them."""
    grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True)

    def step(params, opt_state, state, batch):
        (loss, state), grads, stats = grad_fn(params, state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, (loss, stats)

    return _jit(step)


def make_eva_update_step(w: Workload, tx: optax.GradientTransformationExtraArgs) -> Callable:
    """``jax.value_and_grad`` and Eva's update, the statistics an extra input."""

    def step(params, opt_state, state, batch, stats):
        (loss, state), grads = jax.value_and_grad(w.loss_fn, has_aux=True)(
            params, state, batch
        )
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, state, loss

    return _jit(step)


# ---------------------------------------------------------------------------
# Timing.


def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


@dataclasses.dataclass
class Runner:
    """One variant: its step function and its own (donated) buffers."""

    name: str
    step: Callable
    params: Any
    opt_state: Any
    state: Any
    compile_s: float = 0.0
    cost: dict[str, float] = dataclasses.field(default_factory=dict)
    first_step_s: float = 0.0
    period: int = 1
    state_bytes: int = 0
    per_step_s: list[float] = dataclasses.field(default_factory=list)
    cpu_per_step_s: list[float] = dataclasses.field(default_factory=list)

    def steps_per_round(self, k: int) -> int:
        """``k`` rounded up to whole periods: ``ceil(k / period) * period``."""
        return -(-k // self.period) * self.period

    def run(self, batch: Any, n: int) -> Any:
        out = None
        for _ in range(n):
            self.params, self.opt_state, self.state, out = self.step(
                self.params, self.opt_state, self.state, batch
            )
        return out

    def time(self, batch: Any, n: int) -> tuple[float, float]:
        """Wall-clock and process CPU seconds per step over ``n`` steps."""
        c0, t0 = time.process_time(), time.perf_counter()
        out = self.run(batch, n)
        jax.block_until_ready((self.params, self.opt_state, self.state, out))
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def _cost(compiled: Any) -> dict[str, float]:
    """XLA's static cost estimate of a compiled step (no timing involved)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # not every backend provides one
        return {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {
        "gflop": float(ca.get("flops", 0.0)) / 1e9,
        "mb_accessed": float(ca.get("bytes accessed", 0.0)) / 1e6,
    }


def build_runners(
    w: Workload, optimizers: Sequence[str], breakdown: bool
) -> tuple[list[Runner], dict[str, str]]:
    """The runners, and for each optimizer that could not be built, its error."""
    layouts = workload_layouts(w)
    specs: dict[str, OptimizerSpec] = {}
    errors: dict[str, str] = {}
    for name in optimizers:
        try:
            specs[name] = optimizer_spec(name, w, layouts)
        except Exception as e:  # report, and go on with the others
            errors[name] = f"{type(e).__name__}: {e}"
    sgd = specs["sgd"].tx
    variants: list[tuple[str, Callable, optax.GradientTransformation, tuple, int]] = []
    for name, spec in specs.items():
        variants.append((name, make_step(w, spec), spec.tx, (), spec.period))
        if name == "sgd" and breakdown:
            eva = eva_tx(w, w.learning_rate, layouts)
            grad_fn = jax.jit(eva_optax.value_and_grad(w.loss_fn, has_aux=True))
            stats = jax.block_until_ready(grad_fn(w.params, w.state, w.batch)[2])
            variants += [
                ("sgd-again", make_sgd_step(w, sgd), sgd, (), 1),
                ("sgd+capture", make_sgd_capture_step(w, sgd), sgd, (), 1),
                ("sgd-grad+eva-update", make_eva_update_step(w, eva), eva, (stats,), 1),
            ]
    runners = []
    for name, step, tx, extra, period in variants:
        try:
            params, state = _copy(w.params), _copy(w.state)
            opt_state = tx.init(params)
            nbytes = int(eva_optax.state_bytes(tx, w.params))
            t0 = time.perf_counter()
            compiled = step.lower(params, opt_state, state, w.batch, *extra).compile()
            compile_s = time.perf_counter() - t0
            run = (lambda c, e: lambda p, o, s, b: c(p, o, s, b, *e))(compiled, extra)
            runner = Runner(
                name, run, params, opt_state, state, compile_s, cost=_cost(compiled),
                period=period, state_bytes=nbytes,
            )
            t0 = time.perf_counter()
            jax.block_until_ready(runner.run(w.batch, 1))
            runner.first_step_s = time.perf_counter() - t0
        except Exception as e:
            if name == "sgd":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"  {name} FAILED: {errors[name]}", flush=True)
            continue
        runners.append(runner)
        print(
            f"  {name}: compiled in {compile_s:.1f}s, first step {runner.first_step_s:.2f}s",
            flush=True,
        )
    return runners, errors


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


def bench_workload(
    w: Workload,
    rounds: int,
    steps: int,
    warmup: int,
    breakdown: bool,
    optimizers: Sequence[str] = ALL_OPTIMIZERS,
) -> dict[str, Any]:
    runners, errors = build_runners(w, optimizers, breakdown)
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
    variants = {
        r.name: {
            **_summary(r.per_step_s, r.cpu_per_step_s),
            "steps_per_round": r.steps_per_round(steps),
            "period": r.period,
            "state_bytes": r.state_bytes,
            "compile_s": r.compile_s,
            "first_step_s": r.first_step_s,
            "xla_cost": r.cost,
        }
        for r in runners
    }
    base = variants["sgd"]
    for r in runners:
        v = variants[r.name]
        v["over_sgd"] = v["median_ms"] / base["median_ms"]
        v["extra_ms"] = v["median_ms"] - base["median_ms"]
        v["paired_over_sgd"] = statistics.median(
            a / b for a, b in zip(r.per_step_s, sgd.per_step_s)
        )
        v["min_over_sgd"] = v["min_ms"] / base["min_ms"]
        v["cpu_over_sgd"] = v["cpu_median_ms"] / base["cpu_median_ms"]
        v["cpu_extra_ms"] = v["cpu_median_ms"] - base["cpu_median_ms"]
        v["state_mb"] = v["state_bytes"] / 1e6
        v["state_over_sgd"] = (
            v["state_bytes"] / base["state_bytes"] if base["state_bytes"] else float("nan")
        )
    spread = max((v["q75_ms"] - v["q25_ms"]) / v["median_ms"] for v in variants.values())
    out = {
        "description": w.description,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(w.params))),
        "sgd_ms": base["median_ms"],
        "relative_iqr": spread,
        "variants": variants,
        "errors": errors,
    }
    if "eva" in variants:
        eva = variants["eva"]
        out.update({
            "eva_ms": eva["median_ms"],
            "eva_over_sgd": eva["over_sgd"],
            "eva_over_sgd_paired_median": eva["paired_over_sgd"],
            "eva_over_sgd_min": eva["min_over_sgd"],
            "eva_over_sgd_cpu": eva["cpu_over_sgd"],
        })
    return out


# ---------------------------------------------------------------------------
# Reporting.


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": sys.version.split()[0],
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "optax": optax.__version__,
            "flax": flax.__version__,
            "eva_optax": eva_optax.__version__,
            "numpy": np.__version__,
        },
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if x == x else "n/a"


def markdown_tables(results: dict[str, Any]) -> str:
    """One markdown table per workload: time and state size, both vs SGD."""
    out = []
    for name, r in results.items():
        lines = [
            f"### {name}: {r['description']} ({r['num_params']:,} parameters)",
            "",
            "| optimizer | ms/step | ×SGD | state MB | ×SGD state |",
            "|---|---:|---:|---:|---:|",
        ]
        for opt, v in r["variants"].items():
            label = opt if v["period"] == 1 else f"{opt} (every {v['period']})"
            lines.append(
                f"| {label} | {v['median_ms']:.2f} | {v['over_sgd']:.2f} "
                f"| {v['state_mb']:.2f} | {_fmt_ratio(v['state_over_sgd'])} |"
            )
        for opt, err in r.get("errors", {}).items():
            lines.append(f"| {opt} | failed | | | |")
        if r.get("errors"):
            lines.append("")
            lines += [f"- `{opt}` failed: `{err}`" for opt, err in r["errors"].items()]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def text_table(results: dict[str, Any]) -> str:
    header = (
        f"{'workload':<13}{'optimizer':<21}{'ms/step':>10}{'xSGD':>8}"
        f"{'paired':>8}{'min':>8}{'CPU':>8}{'IQR':>6}{'state MB':>10}{'xSGD':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        for opt, v in r["variants"].items():
            iqr = (v["q75_ms"] - v["q25_ms"]) / v["median_ms"]
            lines.append(
                f"{name:<13}{opt:<21}{v['median_ms']:>10.2f}{v['over_sgd']:>8.2f}"
                f"{v['paired_over_sgd']:>8.2f}{v['min_over_sgd']:>8.2f}"
                f"{v['cpu_over_sgd']:>8.2f}{100 * iqr:>5.0f}%"
                f"{v['state_mb']:>10.2f}{_fmt_ratio(v['state_over_sgd']):>7}"
            )
        for opt, err in r.get("errors", {}).items():
            lines.append(f"{name:<13}{opt:<21}  FAILED: {err.splitlines()[0][:200]}")
    return "\n".join(lines)


def robustness_note(results: dict[str, Any]) -> str:
    return (
        "xSGD: ratio of the median wall times per step. Other estimates of the same"
        " ratio:\npaired = median over rounds of the per-round ratio; min = ratio of the"
        " fastest rounds;\nCPU = ratio of the median process CPU time per step (least"
        " sensitive to other load\non the machine). IQR = interquartile range of"
        " the wall times, relative to the median:\nabove ~10% the"
        " machine was contended; rerun, or trust the CPU and paired ratios more.\n"
        "K-FAC, FOOF and Shampoo: per-step averages over whole periods (their inverse"
        " steps included).\nstate MB: eva_optax.state_bytes (10^6 bytes); xSGD state:"
        " relative to SGD with momentum."
    )


def breakdown_table(results: dict[str, Any], markdown: bool) -> str:
    cols = ["workload", "variant", "ms/step", "vs SGD", "extra ms", "CPU ms/step", "CPU vs SGD", "CPU extra ms"]
    rows = []
    for name, r in results.items():
        for variant, v in r["variants"].items():
            rows.append([
                name, variant, f"{v['median_ms']:.2f}", f"{v['over_sgd']:.3f}",
                f"{v['extra_ms']:+.2f}", f"{v['cpu_median_ms']:.2f}",
                f"{v['cpu_over_sgd']:.3f}", f"{v['cpu_extra_ms']:+.2f}",
            ])
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [13, 21] + [13] * (len(cols) - 2)
    fmt = lambda row: "".join(
        f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))
    )
    lines = [fmt(cols), "-" * sum(widths)] + [fmt(row) for row in rows]
    return "\n".join(lines)


def cost_table(results: dict[str, Any], markdown: bool) -> str:
    cols = ["workload", "variant", "GFLOP/step", "vs SGD", "MB accessed", "vs SGD", "compile s"]
    rows = []
    for name, r in results.items():
        base = r["variants"]["sgd"]["xla_cost"]
        for variant, v in r["variants"].items():
            c = v["xla_cost"]
            if not c or not base:
                continue
            ratio = lambda key: c[key] / base[key] if base[key] else float("nan")
            rows.append([
                name, variant, f"{c['gflop']:.3f}", f"{ratio('gflop'):.3f}",
                f"{c['mb_accessed']:.1f}", f"{ratio('mb_accessed'):.3f}",
                f"{v['compile_s']:.1f}",
            ])
    if not rows:
        return "(no XLA cost analysis on this backend)"
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [13, 21] + [12] * (len(cols) - 2)
    fmt = lambda row: "".join(
        f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))
    )
    return "\n".join([fmt(cols), "-" * sum(widths)] + [fmt(row) for row in rows])


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_JSON = os.path.join(RESULTS_DIR, "step_time.json")
DEFAULT_MD = os.path.join(RESULTS_DIR, "step_time.md")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workloads", default=None,
        help=f"comma-separated subset of {','.join(WORKLOADS)}, or all (default: all;"
        " autoencoder with --quick)",
    )
    p.add_argument(
        "--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
        help="comma-separated subset of " + ",".join(ALL_OPTIMIZERS)
        + " (default: all; sgd, the reference, is always added)",
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6; 3 with --quick)")
    p.add_argument(
        "--steps-per-round", type=int, default=None,
        help="steps per optimizer per round (default 3; 1 with --quick); K-FAC, FOOF"
        " and Shampoo run this rounded up to whole periods",
    )
    p.add_argument(
        "--warmup", type=int, default=None,
        help="untimed steps per variant after compilation (default 2; 0 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true",
        help="smoke test: autoencoder only, 3 rounds x 1 step (periodic optimizers"
        " still a whole period), no warmup, writes no files unless --json/--md",
    )
    p.add_argument(
        "--json", metavar="PATH", default=None,
        help="write the results and machine info here (default"
        " benchmarks/results/step_time.json, none with --quick)",
    )
    p.add_argument(
        "--md", metavar="PATH", default=None,
        help="write the markdown tables here (default benchmarks/results/step_time.md,"
        " none with --quick)",
    )
    p.add_argument("--no-save", action="store_true", help="write no files")
    p.add_argument("--markdown", action="store_true", help="also print the markdown tables")
    p.add_argument(
        "--breakdown", action="store_true",
        help="also time SGD again (noise floor), SGD with Eva's capture, and Eva's"
        " update without the capture",
    )
    args = p.parse_args(argv)
    q = args.quick
    if args.workloads is None:
        args.workloads = "autoencoder" if q else "all"
    if args.rounds is None:
        args.rounds = 3 if q else 6
    if args.steps_per_round is None:
        args.steps_per_round = 1 if q else 3
    if args.warmup is None:
        args.warmup = 0 if q else 2
    if args.no_save:
        args.json = args.md = None
    elif not q:
        args.json = args.json or DEFAULT_JSON
        args.md = args.md or DEFAULT_MD
    names = (
        list(WORKLOADS) if args.workloads == "all"
        else [s.strip() for s in args.workloads.split(",") if s.strip()]
    )
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    opts = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = [o for o in opts if o not in ALL_OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizers {unknown}; choose from {', '.join(ALL_OPTIMIZERS)}")
    opts = ["sgd"] + [o for o in dict.fromkeys(opts) if o != "sgd"]
    if args.rounds < 1 or args.steps_per_round < 1 or args.warmup < 0:
        p.error("--rounds and --steps-per-round must be >= 1, --warmup >= 0")
    args.workload_names = names
    args.optimizer_names = opts
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print(
        f"Optimizer step time (SGD momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}) on "
        f"{info['jax_devices']} ({info['processor'] or info['cpu_model'] or info['machine']}, "
        f"{info['cpu_count']} CPUs); jax {jax.__version__}, optax {optax.__version__}, "
        f"flax {flax.__version__}"
    )
    print(
        "Synthetic random data (step time only). "
        f"{args.rounds} rounds x {args.steps_per_round} steps per optimizer (whole"
        f" periods for K-FAC/FOOF/Shampoo), interleaved: {', '.join(args.optimizer_names)}."
    )
    key = jax.random.PRNGKey(args.seed)
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in args.workload_names:
        key, sub = jax.random.split(key)
        w = WORKLOADS[name](sub)
        print(f"\n{name}: {w.description}", flush=True)
        results[name] = bench_workload(
            w, args.rounds, args.steps_per_round, args.warmup, args.breakdown,
            args.optimizer_names,
        )
    total_s = time.perf_counter() - t_start

    md = markdown_tables(results)
    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "rounds": args.rounds,
                "steps_per_round": args.steps_per_round,
                "periodic_steps_per_round": "ceil(steps_per_round / period) * period",
                "warmup": args.warmup,
                "seed": args.seed,
                "optimizers": args.optimizer_names,
                "momentum": MOMENTUM,
                "weight_decay": WEIGHT_DECAY,
                "adamw": {"learning_rate": ADAMW_LR, "weight_decay": ADAMW_WEIGHT_DECAY},
                "data": "synthetic random (step time only)",
                "breakdown": args.breakdown,
                "quick": args.quick,
                "argv": list(sys.argv[1:] if argv is None else argv),
            },
            "results": results,
            "total_s": total_s,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nResults written to {args.json}")
    if args.md:
        cpu = info["cpu_model"] or info["processor"] or info["machine"]
        header = (
            "# Optimizer step time and state size\n\n"
            f"`benchmarks/step_time.py` on {cpu} ({info['usable_cpus']} usable of"
            f" {info['cpu_count']} CPUs, JAX {info['jax_backend']}), jax"
            f" {info['versions']['jax']}, optax {info['versions']['optax']}, flax"
            f" {info['versions']['flax']}, eva_optax {info['versions']['eva_optax']}."
            f" {args.rounds} interleaved rounds x {args.steps_per_round} steps per"
            " optimizer; K-FAC, FOOF and Shampoo run whole periods per round (10, 50,"
            " 10 steps) and report the per-step average, inverse steps included."
            " ms/step: median over rounds of the wall time per step; ×SGD: relative to"
            " SGD with momentum; state MB: `eva_optax.state_bytes` (10^6 bytes)."
            f" Synthetic random data (step time only). Total run time {total_s:.0f}s.\n\n"
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(header + md + "\n")
        print(f"Markdown written to {args.md}")

    print(f"\nTotal benchmark time {total_s:.0f}s. Synthetic random data (step time only).")
    if args.breakdown:
        print("\nBreakdown (medians over rounds; extra = minus SGD):")
        print(breakdown_table(results, args.markdown))
    print(
        "\nXLA's static cost analysis of each compiled step (FLOPs and bytes"
        " accessed as XLA\nestimates them; independent of the load on the machine):"
    )
    print(cost_table(results, args.markdown))
    print()
    print(text_table(results))
    print(robustness_note(results))
    if args.markdown:
        print()
        print(md)
    return results


if __name__ == "__main__":
    main()
