"""Fashion-MNIST deep autoencoder: SGD versus Eva (the ``make demo`` job).

The autoencoder benchmark of the Eva paper: an MLP 784-1000-500-250-30-250-500-1000-784
(ReLU, linear 30-unit code layer, linear output), trained to reconstruct the images with the
mean squared error between the outputs and the pixels scaled to [0, 1] (mean over all
elements), batch 1000, weight decay 5e-4, learning rate decayed linearly to 0 over the run.

Both optimizers start from the same initial parameters and see the same batches in the same
order:

- SGD: ``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))``,
  lr 0.6 (the paper's value);
- Eva: ``eva_optax.eva(lr, momentum=0.9, weight_decay=5e-4)``, lr 0.06 (the paper's value),
  with the Kronecker vectors captured by ``eva_optax.value_and_grad``.

The paper's SGD learning rate of 0.6 does not diverge with this loss (the mean over all
784 outputs keeps the gradients small), so no change to the recipe was needed. The learning
rates can be changed with ``--lr-sgd`` / ``--lr-eva``.

Per epoch the script prints the mean training loss over the epoch's minibatches, the test
loss (over the whole test set) and the training wall time (compilation is timed separately),
then a two-row summary.

Usage::

    python examples/autoencoder_demo.py --epochs 3
    python examples/autoencoder_demo.py --epochs 1 --train-limit 10000   # quick run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class Result:
    name: str
    train_losses: list[float] = field(default_factory=list)
    test_losses: list[float] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    compile_time: float = 0.0
    steps: int = 0


def load_split(split: str, data_dir: str | None, limit: int | None) -> np.ndarray:
    """Flattened float32 images in [0, 1] of ``split`` (the first ``limit`` ones)."""
    images, _ = datasets.fashion_mnist(split, data_dir)  # type: ignore[arg-type]
    if limit is not None:
        images = images[:limit]
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def make_sgd_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


def make_eva_step(tx: optax.GradientTransformationExtraArgs) -> Callable[..., Any]:
    grad_fn = eva_optax.value_and_grad(loss_fn)

    def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
        loss, grads, stats = grad_fn(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


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
    name: str,
    tx: optax.GradientTransformation,
    make_step: Callable[[Any], Callable[..., Any]],
    params: Params,
    train_x: np.ndarray,
    test_x: np.ndarray,
    args: argparse.Namespace,
) -> Result:
    """Train from ``params`` with the batch order fixed by ``args.seed``."""
    result = Result(name)
    opt_state = tx.init(params)
    step = make_step(tx)
    evaluate = make_eval(args.batch_size)

    t0 = time.perf_counter()
    step = step.lower(params, opt_state, train_x[: args.batch_size]).compile()
    result.compile_time = time.perf_counter() - t0

    rng = np.random.default_rng(args.seed)  # same batch order for every optimizer
    steps_per_epoch = len(train_x) // args.batch_size
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
            losses.append(loss)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.5f}")
        jax.block_until_ready(params)
        elapsed = time.perf_counter() - t0
        train_loss = float(jnp.mean(jnp.stack(losses)))
        test_loss = evaluate(params, test_x)
        if not np.isfinite(train_loss):
            print(f"{name}: training diverged (loss {train_loss})")
        result.train_losses.append(train_loss)
        result.test_losses.append(test_loss)
        result.epoch_times.append(elapsed)
        result.steps += len(losses)
        print(
            f"{name:>4} epoch {epoch:2d}: train loss {train_loss:.5f}  "
            f"test loss {test_loss:.5f}  time {elapsed:7.1f}s"
        )
    return result


def print_summary(results: Sequence[Result]) -> None:
    print()
    header = (
        f"{'optimizer':<10}{'train loss':>12}{'test loss':>12}"
        f"{'train time':>12}{'ms/step':>10}{'compile':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        total = sum(r.epoch_times)
        print(
            f"{r.name:<10}{r.train_losses[-1]:>12.5f}{r.test_losses[-1]:>12.5f}"
            f"{total:>11.1f}s{1e3 * total / max(r.steps, 1):>10.1f}{r.compile_time:>9.1f}s"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--lr-sgd", type=float, default=0.6)
    p.add_argument("--lr-eva", type=float, default=0.06)
    p.add_argument(
        "--optimizers", default="sgd,eva", help="comma-separated subset of: sgd,eva"
    )
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
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

    def schedule(lr: float) -> optax.Schedule:
        return optax.linear_schedule(lr, 0.0, transition_steps=total_steps)

    wanted = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    results = []
    if "sgd" in wanted:
        tx = optax.chain(
            optax.add_decayed_weights(WEIGHT_DECAY),
            optax.sgd(schedule(args.lr_sgd), momentum=MOMENTUM),
        )
        results.append(train("SGD", tx, make_sgd_step, params, train_x, test_x, args))
    if "eva" in wanted:
        tx = eva_optax.eva(schedule(args.lr_eva), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        results.append(train("Eva", tx, make_eva_step, params, train_x, test_x, args))
    if results:
        print_summary(results)


if __name__ == "__main__":
    main()
