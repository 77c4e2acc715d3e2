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
"""

from __future__ import annotations

import os

# On the CPU backend, JAX's eigh (Shampoo's roots) calls OpenBLAS's LAPACK;
# with several OpenBLAS threads on a busy 2-core machine one batched eigh of
# 56 matrices of 128 x 128 took 10 s instead of 0.08 s. One OpenBLAS thread
# avoids that (set before numpy and jax are imported; an explicit setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import collections
import dataclasses
import glob
import inspect
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax

# The examples' shared harness: models, optimizer registry, training step, machine info,
# op counts (run from the repository root: python -m benchmarks.step_time).
from examples.harness import compiled_ops, report, training
from examples.harness.models import RESNET18_STAGES, Autoencoder, CharTransformer, ResNet
from examples.harness.optimizers import SPEC_BY_KEY, Options, Spec

OPTIONS = Options()  # momentum 0.9, weight decay 5e-4, each optimizer's damping and KL clip


# ---------------------------------------------------------------------------
# Workloads: a loss in the examples' form, ``loss_fn(params, model_state, batch) ->
# (loss, (model_state, metrics))``, with ``model_state`` the non-trained collections
# (BatchNorm statistics, or {}), and ``init(key) -> (params, model_state)``.


@dataclasses.dataclass
class Workload:
  name: str
  description: str
  loss_fn: training.LossFn
  init: Callable[[jax.Array], tuple[Any, Any]]
  batch: Any
  learning_rate: float


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)  # the loss in float32 also for bfloat16 models
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def autoencoder(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  model = Autoencoder()
  batch = jax.random.uniform(key, (1000, 784), jnp.float32)

  def loss_fn(params, state, batch):
    out = model.apply({"params": params}, batch)
    return jnp.mean(jnp.square(out - batch)), (state, {})

  return Workload(
    "autoencoder",
    "MLP 784-1000-500-250-30-250-500-1000-784, MSE, batch 1000",
    loss_fn,
    lambda k: (model.init(k, batch[:1])["params"], {}),
    batch,
    0.01,
  )


def _resnet(
  name: str,
  description: str,
  model: ResNet,
  key: jax.Array,
  shape: tuple[int, ...],
  learning_rate: float,
) -> Workload:
  k_x, k_y = jax.random.split(key)
  x = jax.random.normal(k_x, shape, jnp.float32)
  y = jax.random.randint(k_y, shape[:1], 0, model.num_classes)

  def init(k):
    variables = model.init(k, x[:2], train=False)
    return variables["params"], variables["batch_stats"]

  def loss_fn(params, batch_stats, batch):
    images, labels = batch
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    return _cross_entropy(logits, labels), (updates["batch_stats"], {})

  return Workload(name, description, loss_fn, init, (x, y), learning_rate)


class _PlainCNN(nn.Module):
  """Three 3x3 convolutions (32 channels, bias, ReLU) without BatchNorm, GAP, Dense 10."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(3):
      x = nn.relu(nn.Conv(32, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def cnn(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  model = _PlainCNN()
  k_x, k_y = jax.random.split(key)
  x = jax.random.normal(k_x, (128, 28, 28, 1), jnp.float32)
  y = jax.random.randint(k_y, (128,), 0, 10)

  def loss_fn(params, state, batch):
    return _cross_entropy(model.apply({"params": params}, batch[0]), batch[1]), (state, {})

  return Workload(
    "cnn",
    "3x Conv 3x3/32 with bias, no BatchNorm, GAP, Dense 10; 28x28x1, batch 128",
    loss_fn,
    lambda k: (model.init(k, x[:1])["params"], {}),
    (x, y),
    0.05,
  )


def resnet(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  return _resnet(
    "resnet",
    "ResNet-style CNN 16/32/64 x2 blocks + BatchNorm, 28x28x1, batch 128",
    ResNet(),
    key,
    (128, 28, 28, 1),
    0.05,
  )


def resnet18(
  key: jax.Array, tiny: bool = False, dtype: Any = None, batch_size: int = 128
) -> Workload:
  stages = tuple((c // 8, s) for c, s in RESNET18_STAGES) if tiny else RESNET18_STAGES
  batch_size = 4 if tiny else batch_size
  widths = "/".join(str(c) for c, _ in stages)
  return _resnet(
    "resnet18",
    f"ResNet-18 (CIFAR) {widths} x2 blocks + BatchNorm, 32x32x3, batch"
    f" {batch_size}, {jnp.dtype(dtype or jnp.float32).name}" + (" (tiny)" if tiny else ""),
    ResNet(stages, dtype=dtype),
    key,
    (batch_size, 32, 32, 3),
    0.1,
  )


def _lm(
  name: str,
  description: str,
  model: CharTransformer,
  key: jax.Array,
  batch_size: int,
  seq: int,
  learning_rate: float,
) -> Workload:
  tokens = jax.random.randint(key, (batch_size, seq + 1), 0, model.vocab)

  def loss_fn(params, state, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return _cross_entropy(logits, tokens[:, 1:]), (state, {})

  init = lambda k: (model.init(k, tokens[:1, :-1])["params"], {})
  return Workload(name, description, loss_fn, init, tokens, learning_rate)


def transformer(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  return _lm(
    "transformer",
    "pre-LN transformer 4x(d256, 4 heads, MLP 1024), seq 128, batch 16, vocab 256",
    CharTransformer(vocab=256, d_model=256, mlp_dim=1024, scan=False),
    key,
    16,
    128,
    0.01,
  )


def gpt(key: jax.Array, tiny: bool = False, dtype: Any = None) -> Workload:
  if tiny:
    layers, d, heads, mlp, seq, batch, vocab = 2, 64, 4, 256, 32, 2, 512
  else:
    layers, d, heads, mlp, seq, batch, vocab = 12, 768, 12, 3072, 512, 8, 32768
  model = CharTransformer(
    vocab=vocab,
    d_model=d,
    num_heads=heads,
    mlp_dim=mlp,
    num_layers=layers,
    max_len=seq,
    scan=False,
    dtype=dtype,
  )
  return _lm(
    "gpt",
    f"GPT-style LM {layers}x(d{d}, {heads} heads, MLP {mlp}), seq {seq}, batch"
    f" {batch}, vocab {vocab}, {jnp.dtype(dtype or jnp.float32).name}"
    + (" (tiny)" if tiny else ""),
    model,
    key,
    batch,
    seq,
    3e-3,
  )


def _variant(factory: Callable[..., Workload], name: str, **kwargs: Any) -> Callable:
  def make(key: jax.Array, tiny: bool = False) -> Workload:
    w = factory(key, tiny, **kwargs)
    return dataclasses.replace(w, name=name)

  return make


WORKLOADS: dict[str, Callable[[jax.Array, bool], Workload]] = {
  "autoencoder": _variant(autoencoder, "autoencoder"),
  "resnet": _variant(resnet, "resnet"),
  "transformer": _variant(transformer, "transformer"),
  "cnn": _variant(cnn, "cnn"),
  "resnet18": _variant(resnet18, "resnet18"),
  "resnet18-bf16": _variant(resnet18, "resnet18-bf16", dtype=jnp.bfloat16),
  "resnet18-b512": _variant(resnet18, "resnet18-b512", batch_size=512),
  "resnet18-b512-bf16": _variant(
    resnet18, "resnet18-b512-bf16", batch_size=512, dtype=jnp.bfloat16
  ),
  "gpt": _variant(gpt, "gpt"),
  "gpt-bf16": _variant(gpt, "gpt-bf16", dtype=jnp.bfloat16),
}
DEFAULT_WORKLOADS = ("autoencoder", "resnet", "transformer")


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


def _ops(compiled: Any) -> dict[str, Any]:
  """The top-level operations of a compiled step: total, by opcode and by kind."""
  by_opcode = compiled_ops.count_ops(compiled)
  return {
    "total": sum(by_opcode.values()),
    "by_opcode": dict(by_opcode.most_common()),
    "by_kind": dict(compiled_ops.count_kinds(compiled)),
  }


@dataclasses.dataclass
class Variant:
  """What to compile: a jitted step, its transformation, extra inputs and period."""

  name: str
  step: Callable
  tx: optax.GradientTransformation
  extra: tuple = ()
  period: int = 1
  capture: str = "plain"


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
    variants.append(Variant(name, step, tx, (), period_of(spec), spec.capture))
    if name == "sgd" and breakdown:
      eva = build_tx(SPEC_BY_KEY["eva"], w, layouts)
      if execute:
        grad_fn = jax.jit(eva_optax.value_and_grad(w.loss_fn, has_aux=True))
        captured = jax.block_until_ready(grad_fn(params, state, w.batch)[2])
      else:
        captured = stats
      variants += [
        Variant("sgd-again", training.make_step(spec, tx, w.loss_fn), tx),
        Variant("sgd+capture", make_sgd_capture_step(w, tx), tx, (), 1, "stats"),
        Variant(
          "sgd-grad+eva-update",
          make_eva_update_step(w, eva),
          eva,
          (captured,),
          1,
          "stats",
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
        cost=_cost(compiled),
        ops=_ops(compiled),
        period=v.period,
        state_bytes=nbytes,
      )
      runner.ops["layers"] = layers["matrices" if v.capture == "plain" else "captured"]
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


# ---------------------------------------------------------------------------
# Profile: device time per step by operation, from a jax.profiler trace.


def _instruction_kinds(compiled: Any) -> dict[str, str]:
  """``{instruction name: kind}`` of the operations a compiled step launches."""
  instructions, found = compiled_ops.launched(compiled.as_text())
  kinds = {}
  for i in instructions:
    name = i.text.split("=", 1)[0].strip().removeprefix("ROOT").strip().lstrip("%")
    kinds[name] = kinds[name.replace(".", "_")] = compiled_ops.kind(i, found)
  return kinds  # also under the kernel-name spelling, "." as "_"


def _trace_events(path: str, kinds: dict[str, str]) -> tuple[str, list[tuple[str, float]]]:
  """The operation events of an ``.xplane.pb``: where they come from, and (name, ns).

  On a device: its "XLA Ops" line, else its kernel streams. On the CPU: the events of
  XLA:CPU's threads named after an operation of the step (``kinds``).
  """
  data = jax.profiler.ProfileData.from_file(path)
  planes = list(data.planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  for plane in device:  # the device's HLO-op line, where there is one
    for line in plane.lines:
      if line.name == "XLA Ops":
        return f"{plane.name} XLA Ops", [(e.name, e.duration_ns) for e in line.events]
  events = [
    (e.name, e.duration_ns)
    for plane in device
    for line in plane.lines
    if line.name.startswith("Stream")
    for e in line.events
  ]
  if events:
    return "device kernel streams", events
  events = [
    (e.name, e.duration_ns)
    for plane in planes
    if plane.name == "/host:CPU"
    for line in plane.lines
    if "XLAPjRtCpuClient" in line.name or "XLAEigen" in line.name
    for e in line.events
    if e.name in kinds
  ]
  return "XLA:CPU threads", events


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
    kinds = _instruction_kinds(r.compiled)
    try:
      source, events = _trace_events(files[-1], kinds)
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


def profile_text(results: dict[str, Any]) -> str:
  lines = []
  for name, r in results.items():
    for opt, p in r.get("profile", {}).items():
      if "error" in p:
        lines.append(f"{name} {opt}: profile failed: {p['error']}")
        continue
      kinds = ", ".join(f"{k} {us:.1f}" for k, us in p["by_kind_us_per_step"].items())
      lines += [
        f"{name} {opt}: {p['busy_us_per_step']:.1f} us/step busy ({p['source']},"
        f" {p['steps']} steps traced); by kind (us/step): {kinds}",
        f"  {'us/step':>9} {'share':>6} {'calls':>6}  kind         operation",
      ]
      lines += [
        f"  {t['us_per_step']:>9.1f} {100 * t['share']:>5.1f}% {t['calls_per_step']:>6.1f}"
        f"  {t['kind'] or '-':<12} {t['name'][:90]}"
        for t in p["top"]
      ]
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Reporting.


def _fmt_ratio(x: float) -> str:
  return f"{x:.2f}" if x == x else "n/a"


def _label(opt: str, v: dict[str, Any]) -> str:
  return opt if v["period"] == 1 else f"{opt} (every {v['period']})"


def _failed_lines(r: dict[str, Any], columns: int) -> list[str]:
  if not r.get("errors"):
    return []
  lines = [f"| {opt} | failed |" + " |" * (columns - 2) for opt in r["errors"]]
  return lines + [""] + [f"- `{opt}` failed: `{err}`" for opt, err in r["errors"].items()]


def markdown_tables(results: dict[str, Any]) -> str:
  """One markdown table per timed workload: time and state size, both vs SGD."""
  out = []
  for name, r in results.items():
    if not r.get("timed", True):
      continue
    rounds = f"; {r['rounds']} rounds x {r['steps_per_round']} steps" if "rounds" in r else ""
    lines = [
      f"### {name}: {r['description']} ({r['num_params']:,} parameters{rounds})",
      "",
      "| optimizer | ms/step | ×SGD | state MB | ×SGD state |",
      "|---|---:|---:|---:|---:|",
    ]
    for opt, v in r["variants"].items():
      lines.append(
        f"| {_label(opt, v)} | {v['median_ms']:.2f} | {v['over_sgd']:.2f} "
        f"| {v['state_mb']:.2f} | {_fmt_ratio(v['state_over_sgd'])} |"
      )
    out.append("\n".join(lines + _failed_lines(r, 5)))
  return "\n\n".join(out)


OPS_COLUMNS = (
  ["optimizer", "ops", "×SGD", "extra ops/layer"] + list(compiled_ops.KINDS) + ["compile s"]
)


def _ops_row(opt: str, v: dict[str, Any]) -> list[str]:
  o = v["ops"]
  per_layer = "" if opt == "sgd" else f"{o['extra_per_layer']:+.1f}"
  return (
    [_label(opt, v), str(o["total"]), _fmt_ratio(o["over_sgd"]), per_layer]
    + [str(o["by_kind"].get(k, 0)) for k in compiled_ops.KINDS]
    + [f"{v['compile_s']:.1f}"]
  )


def _ops_caption(name: str, r: dict[str, Any]) -> str:
  layers = r["layers"]
  return (
    f"{name}: {r['description']} ({r['num_params']:,} parameters; {layers['captured']}"
    f" captured layers, {layers['matrices']} parameters of rank >= 2)"
  )


def ops_table(results: dict[str, Any], markdown: bool = False) -> str:
  """Per workload: top-level ops of each compiled step, ×SGD, extra per layer, kinds."""
  out = []
  for name, r in results.items():
    rows = [_ops_row(opt, v) for opt, v in r["variants"].items() if "ops" in v]
    if not rows:
      continue
    if markdown:
      lines = (
        [
          f"### {_ops_caption(name, r)}",
          "",
          "| " + " | ".join(OPS_COLUMNS) + " |",
          "|---|" + "---:|" * (len(OPS_COLUMNS) - 1),
        ]
        + ["| " + " | ".join(row) + " |" for row in rows]
        + _failed_lines(r, len(OPS_COLUMNS))
      )
    else:
      widths = [21, 7, 7, 16] + [12] * len(compiled_ops.KINDS) + [10]
      fmt = lambda row: "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))
      )
      lines = [_ops_caption(name, r), fmt(OPS_COLUMNS), "-" * sum(widths)]
      lines += [fmt(row) for row in rows]
      lines += [
        f"{opt:<21}  FAILED: {err.splitlines()[0][:200]}"
        for opt, err in r.get("errors", {}).items()
      ]
    out.append("\n".join(lines))
  return "\n\n".join(out)


OPS_NOTE = (
  "ops: top-level operations of the compiled step's entry computation (examples.harness.compiled_ops;"
  " kernel launches on a GPU),\ncounted from the compiled object that is timed."
  " extra ops/layer: (ops - SGD's ops) / layers, with layers the\nLayerStats entries of"
  " the capture (optimizers that capture statistics) or the parameters of rank >= 2\n"
  "(plain-gradient ones). fusion .. other: the same ops by kind (dot and convolution"
  " include the\nfusions and library calls around them). compile s: lower + compile."
)


def text_table(results: dict[str, Any]) -> str:
  header = (
    f"{'workload':<19}{'optimizer':<21}{'ms/step':>10}{'xSGD':>8}"
    f"{'paired':>8}{'min':>8}{'CPU':>8}{'IQR':>6}{'state MB':>10}{'xSGD':>7}"
  )
  lines = [header, "-" * len(header)]
  for name, r in results.items():
    if not r.get("timed", True):
      continue
    for opt, v in r["variants"].items():
      iqr = (v["q75_ms"] - v["q25_ms"]) / v["median_ms"]
      lines.append(
        f"{name:<19}{opt:<21}{v['median_ms']:>10.2f}{v['over_sgd']:>8.2f}"
        f"{v['paired_over_sgd']:>8.2f}{v['min_over_sgd']:>8.2f}"
        f"{v['cpu_over_sgd']:>8.2f}{100 * iqr:>5.0f}%"
        f"{v['state_mb']:>10.2f}{_fmt_ratio(v['state_over_sgd']):>7}"
      )
    for opt, err in r.get("errors", {}).items():
      lines.append(f"{name:<19}{opt:<21}  FAILED: {err.splitlines()[0][:200]}")
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


def _grid(cols: list[str], rows: list[list[str]], markdown: bool, width: int) -> str:
  if markdown:
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
  widths = [19, 21] + [width] * (len(cols) - 2)
  fmt = lambda row: "".join(
    f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))
  )
  return "\n".join([fmt(cols), "-" * sum(widths)] + [fmt(row) for row in rows])


def breakdown_table(results: dict[str, Any], markdown: bool) -> str:
  cols = [
    "workload",
    "variant",
    "ms/step",
    "vs SGD",
    "extra ms",
    "CPU ms/step",
    "CPU vs SGD",
    "CPU extra ms",
  ]
  rows = []
  for name, r in results.items():
    if not r.get("timed", True):
      continue
    for variant, v in r["variants"].items():
      rows.append(
        [
          name,
          variant,
          f"{v['median_ms']:.2f}",
          f"{v['over_sgd']:.3f}",
          f"{v['extra_ms']:+.2f}",
          f"{v['cpu_median_ms']:.2f}",
          f"{v['cpu_over_sgd']:.3f}",
          f"{v['cpu_extra_ms']:+.2f}",
        ]
      )
  return _grid(cols, rows, markdown, 13)


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
      rows.append(
        [
          name,
          variant,
          f"{c['gflop']:.3f}",
          f"{ratio('gflop'):.3f}",
          f"{c['mb_accessed']:.1f}",
          f"{ratio('mb_accessed'):.3f}",
          f"{v['compile_s']:.1f}",
        ]
      )
  if not rows:
    return "(no XLA cost analysis on this backend)"
  return _grid(cols, rows, markdown, 12)


def merge_results(payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The results of several runs as one: per workload every variant, a timed one over
  an untimed one, else the first run's; in the order of the registry; the errors of
  the variants no run has; ``timed`` when every variant is."""
  order = {name: i for i, name in enumerate(ALL_OPTIMIZERS)}
  merged: dict[str, Any] = {}
  for payload in payloads:
    for name, r in payload["results"].items():
      m = merged.setdefault(name, {**r, "variants": {}, "errors": {}, "profile": {}})
      for opt, v in r["variants"].items():
        if opt not in m["variants"] or ("median_ms" in v and "median_ms" not in m["variants"][opt]):
          m["variants"][opt] = v
      for opt, p in r.get("profile", {}).items():
        m["profile"].setdefault(opt, p)
  for payload in payloads:
    for name, r in payload["results"].items():
      for opt, err in r.get("errors", {}).items():
        if opt not in merged[name]["variants"]:
          merged[name]["errors"].setdefault(opt, err)
  for m in merged.values():
    m["variants"] = dict(sorted(m["variants"].items(), key=lambda kv: order.get(kv[0], len(order))))
    m["timed"] = all("median_ms" in v for v in m["variants"].values())
  return merged


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


def _device_text(info: dict[str, Any]) -> str:
  return (
    f"{info['devices']} ({info['device_kind']}; {info['cpu'] or info['machine']},"
    f" {info['usable_cpus']} usable of {info['cpu_count']} CPUs)"
  )


def write_outputs(
  args: argparse.Namespace,
  argv: Sequence[str] | None,
  info: dict[str, Any],
  results: dict[str, Any],
  total_s: float,
) -> None:
  """The JSON (``--json``) and markdown (``--md``) files of a run."""
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
        "options": dataclasses.asdict(OPTIONS),
        "learning_rate": "the workload's, for every optimizer",
        "data": "synthetic random (step time only)",
        "breakdown": args.breakdown,
        "quick": args.quick,
        "tiny": args.tiny,
        "ops": args.ops,
        "ops_only": args.ops_only,
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
    v = info["versions"]
    timed = any(r.get("timed", True) for r in results.values())
    header = (
      "# Optimizer step time, op count and state size\n\n"
      f"`benchmarks/step_time.py` on {_device_text(info)}, JAX {info['jax_backend']},"
      f" jax {v['jax']}, optax {v['optax']}, flax {v['flax']}, eva_optax"
      f" {v['eva_optax']}."
    )
    if timed:
      rounds = (
        " Interleaved rounds (their number in each table's heading)"
        if args.rounds is None
        else f" {args.rounds} interleaved rounds x {args.steps_per_round} steps per optimizer"
      )
      header += (
        f"{rounds}; K-FAC, FOOF and Shampoo run whole periods per round (10"
        " steps) and report the per-step average, inverse steps included."
        " ms/step: median over rounds of the wall time per step; ×SGD: relative"
        " to SGD with momentum; state MB: `eva_optax.state_bytes` (10^6 bytes)."
        " Synthetic random data (step time only)."
      )
    header += f" Total run time {total_s:.0f}s.\n\n"
    body = markdown_tables(results)
    if args.ops:
      body += (
        "\n\n## Top-level ops of the compiled step\n\n"
        + OPS_NOTE.replace("\n", " ")
        + "\n\n"
        + ops_table(results, markdown=True)
      )
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
      f.write(header + body.strip() + "\n")
    print(f"Markdown written to {args.md}")


def print_tables(args: argparse.Namespace, results: dict[str, Any]) -> None:
  timed = any(r.get("timed", True) for r in results.values())
  if timed and args.breakdown:
    print("\nBreakdown (medians over rounds; extra = minus SGD):")
    print(breakdown_table(results, args.markdown))
  if timed or args.breakdown:
    print(
      "\nXLA's static cost analysis of each compiled step (FLOPs and bytes"
      " accessed as XLA\nestimates them; independent of the load on the machine):"
    )
    print(cost_table(results, args.markdown))
  if args.ops:
    print("\nTop-level ops of each compiled step:\n")
    print(ops_table(results))
    print(OPS_NOTE)
  if timed:
    print()
    print(text_table(results))
    print(robustness_note(results))
  if any(r.get("profile") for r in results.values()):
    print("\nProfile (device time per step by operation):")
    print(profile_text(results))
  if args.markdown:
    print()
    print(markdown_tables(results))
    if args.ops:
      print()
      print(ops_table(results, markdown=True))


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
    f" {OPTIONS.weight_decay}) on {_device_text(info)}; jax {jax.__version__}, optax"
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
