"""The training loop of the examples: jitted steps, optimizers interleaved, checkpoints.

A task (:class:`Task`) gives a loss ``loss_fn(params, model_state, batch) -> (loss,
(model_state, metrics))``, where ``model_state`` holds the non-trained collections
(BatchNorm statistics, or ``{}``) and ``metrics`` a dict of batch means (e.g. accuracy),
an evaluation ``eval_fn(params, model_state, batch) -> metrics`` and its data.
A :class:`Trainer` trains one optimizer on it, a chunk of steps at a time, and
:func:`interleave` advances several in turn (round-robin), so that every optimizer of a
run meets the same load of the machine. Every trainer starts from the same parameters and
sees the same batches in the same order (each has its own batch-order generator,
``numpy.random.default_rng(seed)``). The test set is evaluated at the end of every epoch
and, with ``RunConfig.eval_every``, every that many steps, so that the time to a target is
resolved within a few steps. :func:`train` runs one optimizer alone.

With a checkpoint directory (``RunConfig.out``; the examples' ``--checkpoint``), after every
epoch the parameters, the model state, the optimizer state, the batch-order
generator and the metrics so far are saved with orbax (``<out>/checkpoints/<optimizer>``,
the latest epoch kept); ``resume=True`` continues an interrupted run from there, with the
same batches and the same result as an uninterrupted one. Timing counts training steps
only: compilation, evaluation and checkpointing are left out of the clock, and so is the
record of where Eva's (Eva-f's) rank-one correction is negligible, taken from the
optimizer state after step 1 and at 25, 50 and 100 % of the budget
(:mod:`examples.harness.curvature`, ``Result.curvature``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import eva_optax

from . import curvature
from .records import from_json, jsonable, restore_checkpoint, save_checkpoint
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
  eval_split: str = "test"  # what test_batches hold: "test", or "validation" (held out)
  metric_labels: dict[str, str] = field(default_factory=dict)  # y-axis names: {"loss": "MSE"}
  # The paper's recipe, for the tuning protocol's "as published" row (None: its CIFAR
  # recipe, one learning rate of 0.1 for SGD, K-FAC and Eva).
  published_lrs: dict[str, float] | None = None
  # The top-level module of the output (vocabulary) layer, which the Eva authors leave
  # unpreconditioned in transformers (the knob study's ``plain_modules``; None: not asked).
  output_layer: str | None = None


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
  eval_steps: list[int] = field(default_factory=list)  # steps done at each evaluation
  eval_times: list[float] = field(default_factory=list)  # training seconds at each
  evals: dict[str, list[float]] = field(default_factory=dict)  # test metrics at each
  diverged: bool = False
  time_to_target: float | None = None  # training seconds to the target (None: never)
  steps_to_target: int | None = None  # steps to the target (None: never)
  seed: int = 0
  steps_per_epoch: int = 0
  budget_steps: int = 0  # the steps the schedule spans
  # Where Eva's (Eva-f's) rank-one correction is negligible, after step 1 and at 25, 50 and
  # 100 % of the budget (:mod:`examples.harness.curvature`); {} where not applicable.
  curvature: dict[str, Any] = field(default_factory=dict)

  @property
  def epochs_done(self) -> int:
    return len(self.epoch_times)

  @property
  def seconds_per_epoch(self) -> float:
    """Training seconds per whole epoch (NaN before the first step)."""
    if not self.steps:
      return float("nan")
    return sum(self.epoch_times) / self.steps * (self.steps_per_epoch or self.steps)

  def final(self, metric: str) -> float:
    """Last value of ``train_<name>`` or ``test_<name>`` (NaN if never measured)."""
    split, _, name = metric.partition("_")
    values = (self.train if split == "train" else self.test).get(name, [])
    return values[-1] if values else float("nan")


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def _grad_fn(
  spec: Spec, loss_fn: LossFn, statistics: tuple[str, ...] | None = None
) -> Callable[..., Any]:
  """The capture of ``statistics`` (default ``spec.statistics``), with ``spec``'s options."""
  return eva_optax.value_and_grad(
    loss_fn,
    has_aux=True,
    statistics=spec.statistics if statistics is None else statistics,
    **dict(spec.capture_options),
  )


def make_step(spec: Spec, tx: optax.GradientTransformation, loss_fn: LossFn) -> Callable[..., Any]:
  """``(params, model_state, opt_state, batch) -> (params, model_state, opt_state, loss,
  metrics)``, jitted, with the first three arguments donated.

  What the gradient call captures is read from the optimizer's state when the step is
  traced: the statistics its layer-wise parts average (``eva_optax.statistics_needed``;
  none: ``jax.value_and_grad``), gated by ``eva_optax.factors_due`` where the state holds
  a ``FactorGate`` (K-FAC, FOOF), with ``spec.capture_options``. Every update also gets
  ``obj_fn``, the loss of this batch (model state fixed) as a function of the
  parameters, for Sophia's Hessian-vector products; the other optimizers ignore it.
  """
  tx = optax.with_extra_args_support(tx)
  grad_fns: dict[tuple[str, ...], Callable[..., Any]] = {}

  def step(params, model_state, opt_state, batch):
    extra = {"obj_fn": lambda p: loss_fn(p, model_state, batch)[0]}
    statistics = eva_optax.statistics_needed(opt_state)
    if statistics:
      if statistics not in grad_fns:
        grad_fns[statistics] = _grad_fn(spec, loss_fn, statistics)
      gate = {}
      if eva_optax.has_factor_gate(opt_state):
        gate["factors_due"] = eva_optax.factors_due(opt_state)
      (loss, (new_state, metrics)), grads, extra["stats"] = grad_fns[statistics](
        params, model_state, batch, **gate
      )
    else:
      (loss, (new_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, batch
      )
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), new_state, opt_state, loss, metrics

  return jax.jit(step, donate_argnums=(0, 1, 2))


def captured_layouts(spec: Spec, task: Task, params: Params, model_state: Any) -> Any:
  """Every layer's :class:`eva_optax.KernelLayout` from an abstract capture pass
  (``jax.eval_shape``) of ``spec.statistics``; ``None`` for a spec that captures none."""
  if spec.statistics is None:
    return None
  abstract = jax.eval_shape(_grad_fn(spec, task.loss_fn), params, model_state, task.example_batch)
  return eva_optax.layouts_of(abstract[2])


def build_optimizer(
  spec: Spec,
  lr: float,
  total_steps: int,
  task: Task,
  options: Options,
  params: Params,
  model_state: Any,
  layouts: Any = None,
) -> optax.GradientTransformation:
  """``spec``'s transformation on ``task``'s schedule; ``layouts=`` where it takes them.

  The layouts come from an abstract capture pass (:func:`captured_layouts`, unless given),
  so layers whose kernel layout cannot be guessed from shapes (scanned blocks,
  ``DenseGeneral``) are preconditioned correctly.
  """
  kwargs = {}
  if spec.statistics is not None and spec.accepts("layouts"):
    kwargs["layouts"] = layouts or captured_layouts(spec, task, params, model_state)
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


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RunConfig:
  """How long and how a run trains, evaluates and saves.

  ``steps`` is the budget: a whole schedule over that many steps (``None``: ``epochs``
  whole epochs). The test set is evaluated at the end of every epoch, and every
  ``eval_every`` steps as well when it is positive.
  """

  epochs: int
  seed: int = 0
  out: Path | None = None  # checkpoints under out/checkpoints/<key>; None: no checkpoints
  resume: bool = False
  fingerprint: tuple[tuple[str, Any], ...] = ()  # settings a resumed run must share
  eval_every: int = 0
  steps: int | None = None

  def total_steps(self, steps_per_epoch: int) -> int:
    """The budget in steps."""
    return self.epochs * steps_per_epoch if self.steps is None else self.steps


class Trainer:
  """One optimizer's run on ``task``, advanced a chunk of steps at a time (:meth:`advance`).

  A trainer owns its parameters (copies of ``params``), model state, optimizer state and
  batch-order generator (``numpy.random.default_rng(config.seed)``): every trainer of a
  run sees the same batches in the same order, whatever order the trainers are advanced
  in. Its step is compiled when it is built, before any trainer trains. The clock counts
  the training steps only (fetching the batch, the step, waiting for its loss), not the
  evaluations and checkpoints between them.
  """

  def __init__(
    self,
    task: Task,
    spec: Spec,
    lr: float,
    options: Options,
    params: Params,
    model_state: Any,
    config: RunConfig,
    name: str | None = None,
    checkpoint_name: str | None = None,
  ) -> None:
    self.task, self.config = task, config
    self.total_steps = config.total_steps(task.steps_per_epoch)
    if self.total_steps < 1:
      raise ValueError(f"{task.name}: a budget of {self.total_steps} steps")
    self.params, self.model_state = _copy(params), _copy(model_state)
    self._layouts = captured_layouts(spec, task, self.params, self.model_state)
    tx = build_optimizer(
      spec, lr, self.total_steps, task, options, self.params, self.model_state, self._layouts
    )
    self._damping = curvature.damping_of(spec, options)
    self._curvature_steps = set(curvature.checkpoint_steps(self.total_steps))
    self.opt_state = tx.init(self.params)
    self.result = Result(
      spec.key,
      name or spec.name,
      lr,
      state_bytes=int(eva_optax.state_bytes(tx, self.params)),
      seed=config.seed,
      steps_per_epoch=task.steps_per_epoch,
      budget_steps=self.total_steps,
    )
    self.rng = np.random.default_rng(config.seed)
    self._fingerprint = {**dict(config.fingerprint), "lr": lr, "optimizer": spec.key}
    self._ckpt_dir = (
      None
      if config.out is None
      else Path(config.out) / "checkpoints" / (checkpoint_name or spec.key)
    )
    if config.resume and self._ckpt_dir is not None:
      self._restore()
    self._clock = sum(self.result.epoch_times)
    self._batches: Any = None  # the current epoch's batches (None between epochs)
    self._losses: list[float] = []
    self._sums: dict[str, float] = {}
    self._epoch_time = 0.0

    step = make_step(spec, tx, task.loss_fn)
    t0 = time.perf_counter()
    self._step = step.lower(
      self.params, self.model_state, self.opt_state, task.example_batch
    ).compile()
    self.result.compile_time = time.perf_counter() - t0

  @property
  def remaining(self) -> int:
    """Steps left in the budget (0 once it is spent or the run diverged)."""
    return 0 if self.result.diverged else self.total_steps - self.result.steps

  @property
  def done(self) -> bool:
    return self.remaining == 0

  def _restore(self) -> None:
    assert self._ckpt_dir is not None
    restored = restore_checkpoint(
      self._ckpt_dir,
      {"params": self.params, "model_state": self.model_state, "opt_state": self.opt_state},
    )
    if restored is None:
      return
    arrays, meta = restored
    saved = meta["fingerprint"]
    diff = {
      k: (saved.get(k), v) for k, v in jsonable(self._fingerprint).items() if saved.get(k) != v
    }
    if diff:
      raise SystemExit(
        f"--resume: the checkpoint in {self._ckpt_dir} was made with other settings "
        + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
        + "; use another --out or drop --resume"
      )
    self.params, self.model_state, self.opt_state = (
      arrays["params"],
      arrays["model_state"],
      arrays["opt_state"],
    )
    self.result = Result(**from_json(meta["result"]))
    self.rng.bit_generator.state = meta["rng"]
    print(
      f"{self.result.name}: resumed after epoch {self.result.epochs_done} from {self._ckpt_dir}"
    )

  def _epoch_length(self) -> int:
    done = self.result.epochs_done * self.task.steps_per_epoch
    return min(self.task.steps_per_epoch, self.total_steps - done)

  def advance(self, steps: int) -> int:
    """Train up to ``steps`` more steps (fewer where the budget ends); returns how many."""
    r = self.result
    done = 0
    while done < steps and not self.done:
      if self._batches is None:
        self._batches = iter(self.task.train_epoch(self.rng))
      t0 = time.perf_counter()
      batch = next(self._batches)
      self.params, self.model_state, self.opt_state, loss, metrics = self._step(
        self.params, self.model_state, self.opt_state, batch
      )
      loss = float(loss)  # waits for the step: the wall times are real
      elapsed = time.perf_counter() - t0
      self._clock += elapsed
      self._epoch_time += elapsed
      self._losses.append(loss)
      for k, v in metrics.items():
        self._sums[k] = self._sums.get(k, 0.0) + float(v)
      r.step_losses.append(loss)
      r.step_times.append(self._clock)
      r.steps += 1
      done += 1
      if not np.isfinite(loss):
        r.diverged = True
        print(f"{r.name}: training diverged at step {r.steps} (loss {loss})")
      elif r.steps in self._curvature_steps:  # host-side, off the clock
        curvature.record(
          r.curvature, r.steps, self.params, self.opt_state, self._layouts, self._damping
        )
      if r.diverged or len(self._losses) == self._epoch_length():
        self._end_epoch()
      elif self.config.eval_every and r.steps % self.config.eval_every == 0:
        self._evaluate()
    return done

  def _evaluate(self) -> dict[str, float]:
    """Evaluate now; the metrics go into ``evals`` with the step count and the clock."""
    r = self.result
    metrics = evaluate(self.task, self.params, self.model_state)
    r.eval_steps.append(r.steps)
    r.eval_times.append(self._clock)
    for k, v in metrics.items():
      r.evals.setdefault(k, []).append(v)
    return metrics

  def _end_epoch(self) -> None:
    r = self.result
    n = len(self._losses)
    r.epoch_times.append(self._epoch_time)
    train_metrics = {
      "loss": float(np.mean(self._losses)),
      **{k: v / n for k, v in self._sums.items()},
    }
    for k, v in train_metrics.items():
      r.train.setdefault(k, []).append(v)
    test_metrics = {} if r.diverged else self._evaluate()
    for k, v in test_metrics.items():
      r.test.setdefault(k, []).append(v)
    print(
      f"{r.name:>8} epoch {r.epochs_done:3d}: "
      + "  ".join(f"train {k} {v:.5g}" for k, v in train_metrics.items())
      + "  "
      + "  ".join(f"test {k} {v:.5g}" for k, v in test_metrics.items())
      + f"  time {self._epoch_time:6.1f}s"
    )
    if hasattr(self._batches, "close"):
      self._batches.close()
    self._batches, self._losses, self._sums, self._epoch_time = None, [], {}, 0.0
    if self._ckpt_dir is not None:
      save_checkpoint(
        self._ckpt_dir,
        r.epochs_done,
        {"params": self.params, "model_state": self.model_state, "opt_state": self.opt_state},
        jsonable(
          {
            "fingerprint": self._fingerprint,
            "rng": self.rng.bit_generator.state,
            "result": asdict(r),
          }
        ),
      )


def interleave(trainers: Sequence[Trainer], chunk: int = 10) -> list[Result]:
  """Advance the trainers in turn, ``chunk`` steps each, until every budget is spent.

  Round-robin, so that a burst of load on a shared machine is spread over every
  optimizer instead of landing on the one that happens to run then. Returns the results
  in the order of ``trainers``.
  """
  if chunk < 1:
    raise ValueError(f"chunk must be at least 1, got {chunk}")
  bar = tqdm(total=sum(t.remaining for t in trainers), desc="training", leave=False, disable=None)
  while active := [t for t in trainers if not t.done]:
    for t in active:
      bar.set_postfix(optimizer=t.result.name, refresh=False)
      bar.update(t.advance(chunk))
  bar.close()
  return [t.result for t in trainers]


def train(
  task: Task,
  spec: Spec,
  lr: float,
  options: Options,
  params: Params,
  model_state: Any,
  config: RunConfig,
) -> Result:
  """Train ``spec`` alone on ``task`` for the budget of ``config``, from ``params``."""
  trainer = Trainer(task, spec, lr, options, params, model_state, config)
  return interleave([trainer], chunk=max(1, trainer.remaining))[0]
