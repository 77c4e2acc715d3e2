"""The training loop of the examples: jitted steps, epochs, checkpoints and ``--resume``.

A task (:class:`Task`) gives a loss ``loss_fn(params, model_state, batch) -> (loss,
(model_state, metrics))``, where ``model_state`` holds the non-trained collections
(BatchNorm statistics, or ``{}``) and ``metrics`` a dict of batch means (e.g. accuracy),
an evaluation ``eval_fn(params, model_state, batch) -> metrics`` and its data.
:func:`train` trains one optimizer on it: every optimizer of a run starts from the same
parameters and sees the same batches in the same order (the batch order comes from
``numpy.random.default_rng(seed)``).

With a checkpoint directory (``RunConfig.out``; the examples' ``--checkpoint``), after every
epoch the parameters, the model state, the optimizer state, the batch-order
generator and the metrics so far are saved with orbax (``<out>/checkpoints/<optimizer>``,
the latest epoch kept); ``resume=True`` continues an interrupted run from there, with the
same batches and the same result as an uninterrupted one. Timing counts training steps
only: compilation, evaluation and checkpointing are left out of the clock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import eva_optax

from .optimizers import Options, Spec

Params = Any
Batch = Any
LossFn = Callable[[Params, Any, Batch], tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]
EvalFn = Callable[[Params, Any, Batch], dict[str, jax.Array]]


@dataclass(frozen=True)
class Target:
    """The quality every optimizer is timed to: SGD's final value of ``metric``.

    ``metric`` is ``"train_loss"`` (checked at every step, on the mean of the last
    ``window`` step losses) or ``"test_<name>"`` (checked at the end of each epoch).
    """

    metric: str = "train_loss"
    higher_is_better: bool = False


@dataclass
class Task:
    """What an example trains: model, loss, evaluation and data."""

    name: str
    init: Callable[[jax.Array], tuple[Params, Any]]  # key -> (params, model_state)
    loss_fn: LossFn
    eval_fn: EvalFn
    train_epoch: Callable[[np.random.Generator], Iterable[Batch]]  # one epoch of batches
    test_batches: Callable[[], Iterable[Batch]]
    steps_per_epoch: int
    example_batch: Batch
    schedule: Callable[[float, int], optax.Schedule]  # (peak lr, total steps) -> schedule
    default_lrs: dict[str, float]
    target: Target = Target()
    description: str = ""


@dataclass
class Result:
    """Everything measured for one optimizer (what ``metrics.json`` holds)."""

    key: str
    name: str
    lr: float
    state_bytes: int = 0
    compile_time: float = 0.0
    steps: int = 0
    epoch_times: list[float] = field(default_factory=list)  # training seconds per epoch
    train: dict[str, list[float]] = field(default_factory=dict)  # per-epoch means
    test: dict[str, list[float]] = field(default_factory=dict)  # per-epoch, whole test set
    step_losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # cumulative training seconds
    diverged: bool = False
    time_to_target: float | None = None

    @property
    def epochs_done(self) -> int:
        return len(self.epoch_times)

    def final(self, metric: str) -> float:
        """Last value of ``train_<name>`` or ``test_<name>`` (NaN if never measured)."""
        split, _, name = metric.partition("_")
        values = (self.train if split == "train" else self.test).get(name, [])
        return values[-1] if values else float("nan")


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def _grad_fn(spec: Spec, loss_fn: LossFn) -> Callable[..., Any]:
    return eva_optax.value_and_grad(loss_fn, has_aux=True, statistics=spec.statistics)


def make_step(
    spec: Spec, tx: optax.GradientTransformation, loss_fn: LossFn
) -> Callable[..., Any]:
    """``(params, model_state, opt_state, batch) -> (params, model_state, opt_state, loss,
    metrics)``, jitted, with the first three arguments donated."""
    if spec.capture == "plain":

        def step(params, model_state, opt_state, batch):
            (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, model_state, batch
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), model_state, opt_state, loss, metrics

    else:
        grad_fn = _grad_fn(spec, loss_fn)
        gated = spec.capture == "gated"

        def step(params, model_state, opt_state, batch):
            kwargs = {"factors_due": eva_optax.factors_due(opt_state)} if gated else {}
            (loss, (model_state, metrics)), grads, stats = grad_fn(
                params, model_state, batch, **kwargs
            )
            updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
            return optax.apply_updates(params, updates), model_state, opt_state, loss, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


def build_optimizer(
    spec: Spec, lr: float, total_steps: int, task: Task, options: Options, params: Params,
    model_state: Any,
) -> optax.GradientTransformation:
    """``spec``'s transformation on ``task``'s schedule; ``layouts=`` where it takes them.

    The layouts come from an abstract capture pass (``jax.eval_shape``), so layers whose
    kernel layout cannot be guessed from shapes (scanned blocks, ``DenseGeneral``) are
    preconditioned correctly.
    """
    kwargs = {}
    if spec.statistics is not None and spec.accepts("layouts"):
        abstract = jax.eval_shape(
            _grad_fn(spec, task.loss_fn), params, model_state, task.example_batch
        )
        kwargs["layouts"] = eva_optax.layouts_of(abstract[2])
    return spec.build(task.schedule(lr, total_steps), options, **kwargs)


@functools.cache
def _jitted(fn: EvalFn) -> Callable[..., dict[str, jax.Array]]:
    return jax.jit(fn)  # one jitted function per eval_fn: compiled once, not every epoch


def evaluate(task: Task, params: Params, model_state: Any) -> dict[str, float]:
    """Means of ``task.eval_fn`` over the whole test set, weighted by batch size."""
    eval_batch = _jitted(task.eval_fn)
    totals: dict[str, float] = {}
    count = 0
    for batch in task.test_batches():
        n = len(jax.tree.leaves(batch)[0])
        for k, v in eval_batch(params, model_state, batch).items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        count += n
    if count == 0:
        raise ValueError(f"{task.name}: the test set is empty")
    return {k: v / count for k, v in totals.items()}


# ----------------------------------------------------------------------------- checkpoints


def _manager(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
    )


def save_checkpoint(
    directory: Path, epoch: int, arrays: dict[str, Any], meta: dict[str, Any]
) -> None:
    """Save ``arrays`` (params, model state, optimizer state) and JSON ``meta`` at ``epoch``."""
    import orbax.checkpoint as ocp

    with _manager(directory) as mgr:
        mgr.save(
            epoch,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )


def restore_checkpoint(
    directory: Path, like: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The latest ``(arrays, meta)`` saved in ``directory`` (shaped like ``like``), or None."""
    import orbax.checkpoint as ocp

    if not directory.exists():
        return None
    with _manager(directory) as mgr:
        epoch = mgr.latest_step()
        if epoch is None:
            return None
        restored = mgr.restore(
            epoch,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()
            ),
        )
    return restored["arrays"], restored["meta"]


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RunConfig:
    epochs: int
    seed: int = 0
    out: Path | None = None  # checkpoints under out/checkpoints/<key>; None: no checkpoints
    resume: bool = False
    fingerprint: tuple[tuple[str, Any], ...] = ()  # settings a resumed run must share


def train(
    task: Task,
    spec: Spec,
    lr: float,
    options: Options,
    params: Params,
    model_state: Any,
    config: RunConfig,
) -> Result:
    """Train ``spec`` on ``task`` for ``config.epochs`` epochs from ``params``."""
    total_steps = config.epochs * task.steps_per_epoch
    params, model_state = _copy(params), _copy(model_state)
    tx = build_optimizer(spec, lr, total_steps, task, options, params, model_state)
    opt_state = tx.init(params)
    result = Result(spec.key, spec.name, lr, state_bytes=int(eva_optax.state_bytes(tx, params)))
    rng = np.random.default_rng(config.seed)
    fingerprint = {**dict(config.fingerprint), "lr": lr, "optimizer": spec.key}
    ckpt_dir = None if config.out is None else Path(config.out) / "checkpoints" / spec.key

    if config.resume and ckpt_dir is not None:
        restored = restore_checkpoint(
            ckpt_dir, {"params": params, "model_state": model_state, "opt_state": opt_state}
        )
        if restored is not None:
            arrays, meta = restored
            saved = meta["fingerprint"]
            diff = {k: (saved.get(k), v) for k, v in jsonable(fingerprint).items()
                    if saved.get(k) != v}
            if diff:
                raise SystemExit(
                    f"--resume: the checkpoint in {ckpt_dir} was made with other settings "
                    + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
                    + "; use another --out or drop --resume"
                )
            params, model_state, opt_state = (
                arrays["params"], arrays["model_state"], arrays["opt_state"]
            )
            result = Result(**from_json(meta["result"]))
            rng.bit_generator.state = meta["rng"]
            print(f"{spec.name}: resumed after epoch {result.epochs_done} from {ckpt_dir}")

    step = make_step(spec, tx, task.loss_fn)
    t0 = time.perf_counter()
    step = step.lower(params, model_state, opt_state, task.example_batch).compile()
    result.compile_time = time.perf_counter() - t0

    clock = sum(result.epoch_times)
    for epoch in range(result.epochs_done + 1, config.epochs + 1):
        if result.diverged:
            break
        losses: list[float] = []
        sums: dict[str, float] = {}
        bar = tqdm(
            task.train_epoch(rng), total=task.steps_per_epoch,
            desc=f"{spec.name} epoch {epoch}/{config.epochs}", leave=False, disable=None,
        )
        t0 = time.perf_counter()
        for batch in bar:
            params, model_state, opt_state, loss, metrics = step(
                params, model_state, opt_state, batch
            )
            loss = float(loss)  # waits for the step: the wall times are real
            losses.append(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            result.step_losses.append(loss)
            result.step_times.append(clock + time.perf_counter() - t0)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4g}")
        elapsed = time.perf_counter() - t0
        bar.close()
        clock += elapsed
        result.steps += len(losses)
        result.epoch_times.append(elapsed)
        train_metrics = {"loss": float(np.mean(losses)), **{k: v / len(losses) for k, v in sums.items()}}
        for k, v in train_metrics.items():
            result.train.setdefault(k, []).append(v)
        if not np.isfinite(train_metrics["loss"]):
            result.diverged = True
            test_metrics = {}
            print(f"{spec.name}: training diverged in epoch {epoch} (loss {train_metrics['loss']})")
        else:
            test_metrics = evaluate(task, params, model_state)
        for k, v in test_metrics.items():
            result.test.setdefault(k, []).append(v)
        print(
            f"{spec.name:>8} epoch {epoch:3d}: "
            + "  ".join(f"train {k} {v:.5g}" for k, v in train_metrics.items())
            + "  " + "  ".join(f"test {k} {v:.5g}" for k, v in test_metrics.items())
            + f"  time {elapsed:6.1f}s"
        )
        if ckpt_dir is not None:
            save_checkpoint(
                ckpt_dir, epoch,
                {"params": params, "model_state": model_state, "opt_state": opt_state},
                jsonable({"fingerprint": fingerprint, "rng": rng.bit_generator.state,
                           "result": asdict(result)}),
            )
    return result


def jsonable(x: Any) -> Any:
    """Tuples as lists and non-finite floats as strings, as JSON gives them back."""
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def from_json(x: Any) -> Any:
    """Inverse of :func:`jsonable` for the floats: ``"nan"``/``"inf"`` back to floats."""
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json(v) for v in x]
    return x
