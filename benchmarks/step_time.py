"""Step time of Eva versus SGD with momentum (the ``make bench`` job).

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
``optax.apply_updates``) with donated parameter and optimizer-state buffers:

- SGD: ``jax.value_and_grad`` and
  ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))``;
- Eva: ``eva_optax.value_and_grad`` and ``eva_optax.eva(lr, momentum=0.9,
  weight_decay=wd)`` on the same loss.

Both steps are compiled and run once first; then, for each round, ``k`` SGD steps
and ``k`` Eva steps are timed back to back (``block_until_ready`` at the end of
each group), so both see the same machine conditions. The table reports, per
optimizer, the median over rounds of the wall-clock time per step, and the ratio
Eva/SGD. Next to it the text table gives three other estimates of the same ratio
(median of the per-round ratios, ratio of the fastest rounds, ratio of the median
process CPU time per step) and the spread of the rounds: on a shared machine the
wall time of a step can change by tens of percent from one second to the next,
and the CPU-time ratio is then the most stable of the four.

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

Usage::

    python benchmarks/step_time.py                       # all workloads, defaults
    python benchmarks/step_time.py --workloads autoencoder --rounds 5 --markdown
    python benchmarks/step_time.py --breakdown --json step_time.json
"""

from __future__ import annotations

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
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import eva_optax

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


# ---------------------------------------------------------------------------
# Models.


class Autoencoder(nn.Module):
    """784-1000-500-250-30-250-500-1000-784; ReLU except the code and output layers."""

    sizes: Sequence[int] = (1000, 500, 250, 30, 250, 500, 1000, 784)
    code_layer: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.sizes):
            x = nn.Dense(width)(x)
            if i != self.code_layer and i != len(self.sizes) - 1:
                x = nn.relu(x)
        return x


class ResidualBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class SmallResNet(nn.Module):
    """Conv 3x3/16, 3 stages x 2 residual blocks (16/32/64, strides 1/2/2), GAP, Dense."""

    stages: Sequence[tuple[int, int]] = ((16, 1), (32, 2), (64, 2))
    blocks_per_stage: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for features, strides in self.stages:
            for b in range(self.blocks_per_stage):
                x = ResidualBlock(features, strides if b == 0 else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class CausalSelfAttention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        head_dim = d_model // self.num_heads
        proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), name=name)
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # (B, T, H, D)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        t = x.shape[-2]
        mask = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(d_model, axis=(-2, -1), name="out")(out)


class Block(nn.Module):
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CausalSelfAttention(self.num_heads)(nn.LayerNorm()(x))
        y = nn.Dense(self.mlp_dim)(nn.LayerNorm()(x))
        y = nn.Dense(x.shape[-1])(nn.gelu(y))
        return x + y


class Transformer(nn.Module):
    """Pre-LN decoder-only transformer with learned positions and an untied head."""

    vocab: int = 256
    d_model: int = 256
    num_heads: int = 4
    mlp_dim: int = 1024
    num_layers: int = 4
    max_len: int = 128

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.d_model)(tokens)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.d_model)
        )
        x = x + pos[: tokens.shape[-1]]
        for _ in range(self.num_layers):
            x = Block(self.num_heads, self.mlp_dim)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


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
    model = SmallResNet()
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
    model = Transformer()
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


def sgd_tx(lr: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(lr, momentum=MOMENTUM)
    )


def eva_tx(w: Workload, lr: float) -> optax.GradientTransformationExtraArgs:
    # layouts_of from an abstract pass: correct for every layer, including those
    # whose layout cannot be guessed from the parameter shapes.
    grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True)
    stats = jax.eval_shape(grad_fn, w.params, w.state, w.batch)[2]
    return eva_optax.eva(
        lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
        layouts=eva_optax.layouts_of(stats),
    )


def make_sgd_step(w: Workload, tx: optax.GradientTransformation) -> Callable:
    def step(params, opt_state, state, batch):
        (loss, state), grads = jax.value_and_grad(w.loss_fn, has_aux=True)(
            params, state, batch
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss

    return _jit(step)


def make_eva_step(w: Workload, tx: optax.GradientTransformationExtraArgs) -> Callable:
    grad_fn = eva_optax.value_and_grad(w.loss_fn, has_aux=True)

    def step(params, opt_state, state, batch):
        (loss, state), grads, stats = grad_fn(params, state, batch)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, state, loss

    return _jit(step)


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
    per_step_s: list[float] = dataclasses.field(default_factory=list)
    cpu_per_step_s: list[float] = dataclasses.field(default_factory=list)

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


def build_runners(w: Workload, breakdown: bool) -> list[Runner]:
    lr = w.learning_rate
    sgd, eva = sgd_tx(lr), eva_tx(w, lr)
    variants: list[tuple[str, Callable, optax.GradientTransformation, tuple]] = [
        ("sgd", make_sgd_step(w, sgd), sgd, ()),
    ]
    if breakdown:
        grad_fn = jax.jit(eva_optax.value_and_grad(w.loss_fn, has_aux=True))
        stats = jax.block_until_ready(grad_fn(w.params, w.state, w.batch)[2])
        variants += [
            ("sgd-again", make_sgd_step(w, sgd), sgd, ()),
            ("sgd+capture", make_sgd_capture_step(w, sgd), sgd, ()),
            ("sgd-grad+eva-update", make_eva_update_step(w, eva), eva, (stats,)),
        ]
    variants.append(("eva", make_eva_step(w, eva), eva, ()))
    runners = []
    for name, step, tx, extra in variants:
        params, state = _copy(w.params), _copy(w.state)
        opt_state = tx.init(params)
        t0 = time.perf_counter()
        compiled = step.lower(params, opt_state, state, w.batch, *extra).compile()
        compile_s = time.perf_counter() - t0
        run = (lambda c, e: lambda p, o, s, b: c(p, o, s, b, *e))(compiled, extra)
        runner = Runner(name, run, params, opt_state, state, compile_s, cost=_cost(compiled))
        t0 = time.perf_counter()
        jax.block_until_ready(runner.run(w.batch, 1))
        runner.first_step_s = time.perf_counter() - t0
        runners.append(runner)
    return runners


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
    w: Workload, rounds: int, steps: int, warmup: int, breakdown: bool
) -> dict[str, Any]:
    runners = build_runners(w, breakdown)
    for r in runners:  # a few more untimed steps (caches, allocator)
        jax.block_until_ready(r.run(w.batch, warmup))
    for i in range(rounds):
        for r in runners:
            wall, cpu = r.time(w.batch, steps)
            r.per_step_s.append(wall)
            r.cpu_per_step_s.append(cpu)
        line = "  ".join(f"{r.name} {1e3 * r.per_step_s[-1]:8.2f}" for r in runners)
        print(f"  round {i + 1:2d}/{rounds}: {line} ms/step", flush=True)
    sgd, eva = runners[0], runners[-1]
    variants = {
        r.name: {
            **_summary(r.per_step_s, r.cpu_per_step_s),
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
    spread = max((v["q75_ms"] - v["q25_ms"]) / v["median_ms"] for v in variants.values())
    return {
        "description": w.description,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(w.params))),
        "sgd_ms": base["median_ms"],
        "eva_ms": variants["eva"]["median_ms"],
        "eva_over_sgd": variants["eva"]["over_sgd"],
        "eva_over_sgd_paired_median": variants["eva"]["paired_over_sgd"],
        "eva_over_sgd_min": variants["eva"]["min_over_sgd"],
        "eva_over_sgd_cpu": variants["eva"]["cpu_over_sgd"],
        "relative_iqr": spread,
        "variants": variants,
    }


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


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | SGD ms/step | Eva ms/step | Eva/SGD |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['sgd_ms']:.2f} | {r['eva_ms']:.2f} | {r['eva_over_sgd']:.3f} |"
        )
    return "\n".join(lines)


def text_table(results: dict[str, Any]) -> str:
    header = (
        f"{'workload':<13}{'SGD ms/step':>13}{'Eva ms/step':>13}{'Eva/SGD':>9}"
        f"{'paired':>9}{'min':>8}{'CPU':>8}{'IQR':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(
            f"{name:<13}{r['sgd_ms']:>13.2f}{r['eva_ms']:>13.2f}"
            f"{r['eva_over_sgd']:>9.3f}{r['eva_over_sgd_paired_median']:>9.3f}"
            f"{r['eva_over_sgd_min']:>8.3f}{r['eva_over_sgd_cpu']:>8.3f}"
            f"{100 * r['relative_iqr']:>6.0f}%"
        )
    return "\n".join(lines)


def robustness_note(results: dict[str, Any]) -> str:
    return (
        "Eva/SGD: ratio of the median wall times per step. Other estimates of the same"
        " ratio:\npaired = median over rounds of the per-round ratio; min = ratio of the"
        " fastest rounds;\nCPU = ratio of the median process CPU time per step (least"
        " sensitive to other load\non the machine). IQR = largest interquartile range of"
        " the wall times, relative to\nthe median, over the variants: above ~10% the"
        " machine was contended; rerun, or trust\nthe CPU and paired ratios more."
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workloads", default="all",
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)",
    )
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (default 12)")
    p.add_argument(
        "--steps-per-round", type=int, default=3,
        help="steps per optimizer per round (default 3)",
    )
    p.add_argument(
        "--warmup", type=int, default=2,
        help="untimed steps per variant after compilation (default 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results and machine info here")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument(
        "--breakdown", action="store_true",
        help="also time SGD again (noise floor), SGD with Eva's capture, and Eva's"
        " update without the capture",
    )
    args = p.parse_args(argv)
    names = (
        list(WORKLOADS) if args.workloads == "all"
        else [s.strip() for s in args.workloads.split(",") if s.strip()]
    )
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    if args.rounds < 1 or args.steps_per_round < 1 or args.warmup < 0:
        p.error("--rounds and --steps-per-round must be >= 1, --warmup >= 0")
    args.workload_names = names
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print(
        f"Eva vs SGD (momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}) step time on "
        f"{info['jax_devices']} ({info['processor'] or info['cpu_model'] or info['machine']}, "
        f"{info['cpu_count']} CPUs); jax {jax.__version__}, optax {optax.__version__}, "
        f"flax {flax.__version__}"
    )
    print(
        "Synthetic random data (step time only). "
        f"{args.rounds} rounds x {args.steps_per_round} steps per optimizer, interleaved."
    )
    key = jax.random.PRNGKey(args.seed)
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in args.workload_names:
        key, sub = jax.random.split(key)
        w = WORKLOADS[name](sub)
        print(f"\n{name}: {w.description}", flush=True)
        results[name] = bench_workload(
            w, args.rounds, args.steps_per_round, args.warmup, args.breakdown
        )
        comp = ", ".join(
            f"{k} {v['compile_s']:.1f}s" for k, v in results[name]["variants"].items()
        )
        print(f"  compile: {comp}")
    total_s = time.perf_counter() - t_start

    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "rounds": args.rounds,
                "steps_per_round": args.steps_per_round,
                "warmup": args.warmup,
                "seed": args.seed,
                "momentum": MOMENTUM,
                "weight_decay": WEIGHT_DECAY,
                "data": "synthetic random (step time only)",
                "breakdown": args.breakdown,
            },
            "results": results,
            "total_s": total_s,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nResults written to {args.json}")

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
        print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
