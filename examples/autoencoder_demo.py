"""Fashion-MNIST deep autoencoder: seven optimizers compared (the ``make demo`` job).

The autoencoder benchmark of the Eva paper: an MLP 784-1000-500-250-30-250-500-1000-784
(ReLU, linear 30-unit code layer, linear output), trained to reconstruct the images with the
mean squared error between the outputs and the pixels scaled to [0, 1] (mean over all
elements), batch 1000, weight decay 5e-4, learning rate decayed linearly to 0 over the run.

Every optimizer starts from the same initial parameters and sees the same batches in the same
order (momentum 0.9 wherever there is momentum):

========  ==========================================================  ============
name      optimizer                                                   lr
========  ==========================================================  ============
SGD       ``chain(add_decayed_weights(5e-4), sgd(lr, momentum=0.9))`` 0.6 (paper)
AdamW     ``optax.adamw(lr, weight_decay=5e-4)`` (decoupled, × lr)    1e-3
Eva       ``eva_optax.eva``, statistics ``EVA_STATISTICS``            0.06 (paper)
Eva-f     ``eva_optax.eva_foof``, ``EVA_FOOF_STATISTICS``             0.6
Eva-s     ``eva_optax.eva_shampoo`` (plain gradients)                 0.6
K-FAC     ``eva_optax.kfac(stats_every=10, inverse_every=10)``,       0.06
          ``KFAC_STATISTICS``, ``factors_due`` gate
Shampoo   ``eva_optax.shampoo`` (plain gradients)                     0.6
========  ==========================================================  ============

The paper's learning rates are kept for SGD and Eva. The others were picked by a quick
check: one epoch on the first 20,000 training images (20 steps, lr decayed to 0 over them),
mean training loss of the epoch, lowest kept (SGD 0.6: 0.115, Eva 0.06: 0.101):

- AdamW 3e-4 / 1e-3 / 3e-3: 0.109 / 0.094 / 0.194;
- Eva-f 0.01 / 0.03 / 0.1 / 0.3 / 0.6 / 1.0: 0.205 / 0.198 / 0.163 / 0.127 / 0.124 / 0.125
  (Eva-f's ``kl_normalise`` scaling gives its step an SGD-like length, hence SGD-like rates);
- Eva-s 0.1 / 0.3 / 0.6 / 1.0: 0.189 / 0.129 / 0.104 / 0.126;
- K-FAC 0.02 / 0.06 / 0.2: 0.123 / 0.101 / 0.104;
- Shampoo 0.1 / 0.3 / 0.6 / 1.0: 0.191 / 0.130 / 0.106 / 0.106 (SGD grafting).

Every learning rate is a command-line flag (``--lr-sgd``, ``--lr-adamw``,
``--lr-eva``, ``--lr-eva-f``, ``--lr-eva-s``, ``--lr-kfac``, ``--lr-shampoo``).

Per epoch the script prints the mean training loss over the epoch's minibatches, the test
loss (over the whole test set) and the training wall time (compilation and evaluation are
not counted). At the end it prints a markdown table and writes to ``--out`` (default
``results/demo``):

- ``results.md``: the table: final train loss (mean over the last epoch), final test loss,
  seconds per epoch, time to reach SGD's final training loss, optimizer-state bytes;
- ``metrics.json``: the configuration, and per optimizer every number of the table, the
  per-epoch losses and times and the per-step training losses with their wall times;
- ``loss_vs_epoch.png`` and ``loss_vs_time.png``.

"Time to reach SGD's final training loss" is the training wall time at the first step at
which the mean training loss over the last ``--reach-window`` steps (10 by default) is at or
below SGD's final training loss (its mean over the last epoch); "not reached" otherwise.

Usage::

    python examples/autoencoder_demo.py                      # all seven, 3 epochs
    python examples/autoencoder_demo.py --optimizers sgd,eva --epochs 1 --train-limit 10000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import eva_optax
from eva_optax import datasets

Params = Any
Batch = jax.Array

LAYER_SIZES = (1000, 500, 250, 30, 250, 500, 1000, 784)
CODE_LAYER = 3  # index of the linear 30-unit code layer in LAYER_SIZES
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9


class Autoencoder(nn.Module):
    """784-1000-500-250-30-250-500-1000-784 MLP; ReLU except the code and output layers."""

    sizes: Sequence[int] = LAYER_SIZES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.sizes):
            x = nn.Dense(width)(x)
            if i != CODE_LAYER and i != len(self.sizes) - 1:
                x = nn.relu(x)
        return x


MODEL = Autoencoder()


def loss_fn(params: Params, batch: Batch) -> jax.Array:
    """Mean squared reconstruction error over all elements (pixels in [0, 1])."""
    outputs = MODEL.apply({"params": params}, batch)
    return jnp.mean(jnp.square(outputs - batch))


# --------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class Spec:
    """One optimizer of the comparison."""

    key: str  # the --optimizers name; the flag is --lr-<key>
    name: str  # the name printed in the table
    default_lr: float
    build: Callable[[optax.Schedule], optax.GradientTransformation]
    capture: str  # "plain": jax.value_and_grad; "stats": eva_optax capture; "kfac": + gate
    statistics: Any = None


def _sgd(lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(lr, momentum=MOMENTUM)
    )


SPECS = (
    Spec("sgd", "SGD", 0.6, _sgd, "plain"),
    Spec(
        "adamw", "AdamW", 1e-3, lambda lr: optax.adamw(lr, weight_decay=WEIGHT_DECAY), "plain"
    ),
    Spec(
        "eva",
        "Eva",
        0.06,
        lambda lr: eva_optax.eva(lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        "stats",
        eva_optax.EVA_STATISTICS,
    ),
    Spec(
        "eva-f",
        "Eva-f",
        0.6,
        lambda lr: eva_optax.eva_foof(lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        "stats",
        eva_optax.EVA_FOOF_STATISTICS,
    ),
    Spec(
        "eva-s",
        "Eva-s",
        0.6,
        lambda lr: eva_optax.eva_shampoo(lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        "plain",
    ),
    Spec(
        "kfac",
        "K-FAC",
        0.06,
        lambda lr: eva_optax.kfac(
            lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, stats_every=10, inverse_every=10
        ),
        "kfac",
        eva_optax.KFAC_STATISTICS,
    ),
    Spec(
        "shampoo",
        "Shampoo",
        0.6,
        lambda lr: eva_optax.shampoo(lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
        "plain",
    ),
)
SPEC_BY_KEY = {s.key: s for s in SPECS}


def make_step(spec: Spec, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """The jitted ``(params, opt_state, batch) -> (params, opt_state, loss)`` for ``spec``."""
    if spec.capture == "plain":

        def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

    else:
        grad_fn = eva_optax.value_and_grad(loss_fn, statistics=spec.statistics)
        gated = spec.capture == "kfac"

        def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
            if gated:  # A and G only on the steps that average them
                due = eva_optax.factors_due(opt_state)
                loss, grads, stats = grad_fn(params, batch, factors_due=due)
            else:
                loss, grads, stats = grad_fn(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
            return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


# --------------------------------------------------------------------------- training


@dataclass
class Result:
    name: str
    lr: float = 0.0
    train_losses: list[float] = field(default_factory=list)  # per epoch (mean over steps)
    test_losses: list[float] = field(default_factory=list)  # per epoch
    epoch_times: list[float] = field(default_factory=list)  # training seconds per epoch
    step_losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # cumulative training seconds
    compile_time: float = 0.0
    steps: int = 0
    state_bytes: int = 0
    time_to_sgd_loss: float | None = None


def load_split(split: str, data_dir: str | None, limit: int | None) -> np.ndarray:
    """Flattened float32 images in [0, 1] of ``split`` (the first ``limit`` ones)."""
    images, _ = datasets.fashion_mnist(split, data_dir)  # type: ignore[arg-type]
    if limit is not None:
        images = images[:limit]
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def make_eval(batch_size: int) -> Callable[[Params, np.ndarray], float]:
    """Mean loss over a whole data set (all elements weighted equally)."""
    batch_loss = jax.jit(loss_fn)

    def evaluate(params: Params, data: np.ndarray) -> float:
        total = 0.0
        for (batch,) in datasets.batches((data,), batch_size, drop_last=False):
            total += float(batch_loss(params, batch)) * len(batch)
        return total / len(data)

    return evaluate


def train(
    spec: Spec,
    lr: float,
    total_steps: int,
    params: Params,
    train_x: np.ndarray,
    test_x: np.ndarray,
    args: argparse.Namespace,
) -> Result:
    """Train from ``params`` with the batch order fixed by ``args.seed``."""
    name = spec.name
    tx = spec.build(optax.linear_schedule(lr, 0.0, transition_steps=total_steps))
    result = Result(name, lr=lr, state_bytes=int(eva_optax.state_bytes(tx, params)))
    opt_state = tx.init(params)
    evaluate = make_eval(args.batch_size)

    t0 = time.perf_counter()
    step = make_step(spec, tx).lower(params, opt_state, train_x[: args.batch_size]).compile()
    result.compile_time = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)  # same batch order for every optimizer
    steps_per_epoch = len(train_x) // args.batch_size
    clock = 0.0  # training seconds so far
    for epoch in range(1, args.epochs + 1):
        losses = []
        t0 = time.perf_counter()
        bar = tqdm(
            datasets.batches((train_x,), args.batch_size, rng=rng),
            total=steps_per_epoch,
            desc=f"{name} epoch {epoch}/{args.epochs}",
            leave=False,
            disable=None,
        )
        for (batch,) in bar:
            params, opt_state, loss = step(params, opt_state, batch)
            loss = float(loss)  # waits for the step: the wall times are real
            losses.append(loss)
            result.step_losses.append(loss)
            result.step_times.append(clock + time.perf_counter() - t0)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{loss:.5f}")
        jax.block_until_ready(params)
        elapsed = time.perf_counter() - t0
        clock += elapsed
        train_loss = float(np.mean(losses))
        test_loss = evaluate(params, test_x)
        if not np.isfinite(train_loss):
            print(f"{name}: training diverged (loss {train_loss})")
        result.train_losses.append(train_loss)
        result.test_losses.append(test_loss)
        result.epoch_times.append(elapsed)
        result.steps += len(losses)
        print(
            f"{name:>7} epoch {epoch:2d}: train loss {train_loss:.5f}  "
            f"test loss {test_loss:.5f}  time {elapsed:7.1f}s"
        )
    return result


def time_to_reach(result: Result, target: float, window: int) -> float | None:
    """Training seconds at the first step whose trailing ``window``-step mean is ≤ target."""
    losses = np.asarray(result.step_losses, dtype=np.float64)
    if not np.isfinite(target) or len(losses) == 0:
        return None
    window = max(1, min(window, len(losses)))
    csum = np.concatenate([[0.0], np.cumsum(losses)])
    for i in range(window - 1, len(losses)):
        mean = (csum[i + 1] - csum[i + 1 - window]) / window
        if np.isfinite(mean) and mean <= target:
            return result.step_times[i]
    return None


# --------------------------------------------------------------------------- reporting


def _fmt_bytes(n: int) -> str:
    return f"{n:,} ({n / 2**20:.1f} MiB)"


def markdown_table(results: Sequence[Result], target: float | None) -> str:
    target_txt = f"{target:.5f}" if target is not None else "n/a"
    lines = [
        f"| optimizer | lr | final train loss | final test loss | s/epoch "
        f"| time to SGD's final train loss ({target_txt}) | optimizer state bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_epoch = sum(r.epoch_times) / max(len(r.epoch_times), 1)
        reach = f"{r.time_to_sgd_loss:.1f} s" if r.time_to_sgd_loss is not None else "not reached"
        lines.append(
            f"| {r.name} | {r.lr:g} | {r.train_losses[-1]:.5f} | {r.test_losses[-1]:.5f} "
            f"| {per_epoch:.1f} | {reach} | {_fmt_bytes(r.state_bytes)} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        epochs = np.arange(1, len(r.train_losses) + 1)
        ax_train.plot(epochs, r.train_losses, marker="o", label=r.name)
        ax_test.plot(epochs, r.test_losses, marker="o", label=r.name)
    for ax, title in ((ax_train, "train loss (mean over epoch)"), (ax_test, "test loss")):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("MSE")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_epoch.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        (line,) = ax.plot(r.step_times, r.step_losses, alpha=0.8, label=f"{r.name} train")
        ax.plot(
            np.cumsum(r.epoch_times),
            r.test_losses,
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"{r.name} test",
        )
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.set_title("loss vs wall time (train: per step; test: end of epoch)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_time.png", dpi=110)
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    """NaN and infinities as strings: metrics.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(
    results: Sequence[Result], target: float | None, table: str, args: argparse.Namespace,
    info: dict[str, Any],
) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    metrics = {
        "config": {**info, **{k: v for k, v in vars(args).items()}},
        "sgd_final_train_loss": target,
        "optimizers": {
            r.name: {
                **asdict(r),
                "final_train_loss": r.train_losses[-1],
                "final_test_loss": r.test_losses[-1],
                "seconds_per_epoch": sum(r.epoch_times) / max(len(r.epoch_times), 1),
            }
            for r in results
        },
    }
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=1) + "\n")
    plot(results, out)
    return out


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    for spec in SPECS:
        p.add_argument(
            f"--lr-{spec.key}",
            type=float,
            default=spec.default_lr,
            help=f"{spec.name} learning rate (default {spec.default_lr:g})",
        )
    p.add_argument(
        "--optimizers",
        default=",".join(s.key for s in SPECS),
        help="comma-separated subset of: " + ",".join(s.key for s in SPECS),
    )
    p.add_argument("--out", default="results/demo", help="output directory")
    p.add_argument(
        "--reach-window",
        type=int,
        default=10,
        help="steps averaged for the time to reach SGD's final training loss",
    )
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    wanted = [s.strip().lower() for s in args.optimizers.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in SPEC_BY_KEY]
    if unknown or not wanted:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(SPEC_BY_KEY)}")
    args.optimizers = ",".join(wanted)
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    start = time.perf_counter()
    train_x = load_split("train", args.data_dir, args.train_limit)
    test_x = load_split("test", args.data_dir, args.test_limit)
    steps_per_epoch = len(train_x) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--train-limit {len(train_x)} is smaller than the batch size")
    total_steps = args.epochs * steps_per_epoch
    print(
        f"Fashion-MNIST autoencoder: {len(train_x)} train / {len(test_x)} test images, "
        f"batch {args.batch_size}, {steps_per_epoch} steps/epoch, {args.epochs} epochs, "
        f"device {jax.devices()[0].platform}"
    )

    params = MODEL.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 784)))["params"]

    results = []
    for key in args.optimizers.split(","):
        spec = SPEC_BY_KEY[key]
        lr = getattr(args, f"lr_{key.replace('-', '_')}")
        results.append(train(spec, lr, total_steps, params, train_x, test_x, args))

    sgd = next((r for r in results if r.name == "SGD"), None)
    target = sgd.train_losses[-1] if sgd is not None else None
    if target is not None:
        for r in results:
            r.time_to_sgd_loss = time_to_reach(r, target, args.reach_window)
    table = markdown_table(results, target)
    info = {
        "train_images": len(train_x),
        "test_images": len(test_x),
        "steps_per_epoch": steps_per_epoch,
        "device": jax.devices()[0].platform,
    }
    out = write_outputs(results, target, table, args, info)
    print()
    print(table)
    print(
        f"wrote {out / 'results.md'}, {out / 'metrics.json'}, {out / 'loss_vs_epoch.png'}, "
        f"{out / 'loss_vs_time.png'} (total {time.perf_counter() - start:.0f}s)"
    )
    return results


if __name__ == "__main__":
    main()
