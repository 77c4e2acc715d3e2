"""A character-level language model trained on a (data, model) mesh: Eva against AdamW.

The model is ``examples.harness.sharded.Decoder``, a GPT-style decoder whose parameters
carry Flax logical axis names and whose activations are pinned with
``nn.with_logical_constraint``; ``--parallelism`` picks the logical axis rules
(``examples.harness.sharded.RULES``) that map those names onto a ``('data', 'model')``
mesh of ``--mesh D×M`` devices:

* ``tp`` (default): tensor parallelism: heads, MLP units and vocabulary over ``model``,
  the batch over ``data``;
* ``fsdp``: the batch and every parameter's ``embed`` axis over ``data`` (use a ``N×1``
  mesh);
* ``data``: data parallelism, every parameter replicated.

Everything is placed the usual JAX way, and the optimizer is only a line of it:

* the parameters: ``jax.jit(model.init, out_shardings=param_shardings)``, the shardings
  from ``nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(model.init,
  ...)), mesh, rules)`` (the boxes removed with ``nn.unbox``);
* the optimizer state: ``jax.jit(tx.init, out_shardings=state_shardings)`` with
  ``state_shardings = eva_optax.state_shardings(tx, params, param_shardings)`` (for Eva,
  its statistics follow each kernel's axes; for AdamW, the moments follow the params);
* the batch: ``NamedSharding(mesh, P('data'))``, built with
  ``jax.make_array_from_callback`` so that each process places only its own devices' rows;
* the step: ``jax.jit(step, in_shardings=..., out_shardings=...)``; Eva's differs from
  AdamW's by ``eva_optax.value_and_grad`` and ``stats=``.

Data: the corpus of ``examples.char_lm`` (Debian's ``fortunes``, ``--corpus PATH``, or
``$EVA_OPTAX_CORPUS``); when none of them exists this script falls back to the
repository's ``README.md``, saying so. The last 10% of the characters are the test split.
The vocabulary (its characters) is padded to a multiple of 8 and of the model axis, so
that the embedding and the head split over ``model``, the same on every usual mesh.
Training batches are ``--batch-size`` windows of ``--seq-len`` + 1 characters
(``datasets.sequence_batches``, epoch after epoch, the order drawn from ``--seed``); the
test loss is the mean over the first ``--eval-batches`` × ``--batch-size`` windows of the
test split. The learning rate is warmed up over the first 5% of the steps and
cosine-decayed to 10% of its peak (``examples.char_lm.warmup_cosine``).

Learning rates: Eva 0.01 (``--lr``) and AdamW 3e-3 (``--adamw-lr``), the rates of
``examples.char_lm``'s check on the fortunes: Eva at SGD's rate (0.1) / 10, the README's
rule for Eva's rate; AdamW the best of 1e-3 / 3e-3 / 1e-2 there. (``--optimizers sgd``
adds SGD at 0.1, ``--sgd-lr``; ``--optimizers kfac`` adds K-FAC at 0.03, ``--kfac-lr``,
the centre of the tuning protocol's grid, its factors and inverses split over the devices
and each inverse computed on one.) Weight decay 5e-4 for all (``--weight-decay``; L2 for
Eva and SGD, decoupled for AdamW). They were not tuned for this model: a check at the
defaults (2x4 mesh, 200 steps, one seed) on the README as corpus, when the README was a
785-line guide, gave the test losses Eva 0.003 / 0.01 / 0.03 / 0.1: 2.631 / 2.546 / 2.548 /
3.058, AdamW 1e-3 / 3e-3 / 1e-2: 2.672 / 2.514 / 2.433. The README is now a short front
page, so the fallback corpus, and these losses, have changed; install ``fortunes``
(``make corpus``) for a corpus that does not move.

Printed: one row per optimizer with the final training loss (the mean of the last 10
steps' losses), the test loss, the median step time after compilation, and the
collectives of the compiled step by kind
(``examples.harness.compiled_ops.count_collectives``). ``--out FILE`` writes the same,
every step's loss included, as JSON. At the defaults on 8 host devices of a 2-core CPU:
under ``tp`` (2x4) Eva's step has 14 all-reduces and 2 all-gathers, AdamW's 13 and 0;
under ``fsdp`` (8x1) 33 all-gathers and 2 all-reduces, AdamW's 32 and 1 (Eva adds the
packed all-reduce of its per-layer sums and the all-gather of its split statistics).

Checkpoints (orbax, ``examples.harness.records.save_checkpoint``): with
``--checkpoint-dir DIR`` the parameters, the optimizer state and the step are saved at
the end (or after step ``--stop-at``) in ``DIR/<optimizer>``; ``--resume`` restores them
with this run's shardings, whatever the mesh and parallelism of the saving run, and
trains on to ``--steps`` with the batches an uninterrupted run would have seen (the same
losses, to rounding across meshes). A checkpoint made with other settings (sizes, rates,
seed, corpus, ``--steps``) is refused, naming them.

Several processes: ``--coordinator HOST:PORT --num-processes N --process-id I`` call
``jax.distributed.initialize`` (CPU collectives: Gloo) before anything else touches the
devices; the mesh is built over the global ``jax.devices()``. Every process draws the
same batches and feeds its own devices' rows; the losses are those of one process with
all the devices (bit for bit on CPU, 2 processes x 4 devices against 1 x 8), and
checkpoints work the same way (every process saves and restores its own shards).

Usage (on a CPU the host is split into devices; this script sets
``--xla_force_host_platform_device_count`` to the mesh's size when ``XLA_FLAGS`` does not
name a count)::

    python -m examples.sharded_lm --mesh 2x4 --steps 200
    python -m examples.sharded_lm --mesh 8x1 --parallelism fsdp --optimizers eva
    python -m examples.sharded_lm --quick                  # a few tiny steps
    python -m examples.sharded_lm --mesh 2x4 --stop-at 100 --checkpoint-dir /tmp/lm
    python -m examples.sharded_lm --mesh 4x2 --checkpoint-dir /tmp/lm --resume  # steps 101-200

Two processes on one machine, 4 CPU devices each::

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m examples.sharded_lm --quick --coordinator localhost:12355 \\
        --num-processes 2 --process-id 0 &
    python -m examples.sharded_lm --quick --coordinator localhost:12355 \\
        --num-processes 2 --process-id 1
    wait
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eva_optax
from examples.char_lm import LEARNING_RATES, TEST_FRACTION, eval_windows, warmup_cosine
from examples.harness import compiled_ops, datasets, records, sharded
from examples.harness.optimizers import SPEC_BY_KEY, Options, Spec

FALLBACK_CORPUS = Path(__file__).resolve().parents[1] / "README.md"
OPTIMIZERS = ("eva", "adamw", "sgd", "kfac")
TRAIN_WINDOW = 10  # the final training loss is the mean of this many last steps
# The sizes of a normal run and of --quick (a flag given on the command line wins).
SIZES = {
  "steps": 200,
  "batch_size": 32,
  "seq_len": 64,
  "d_model": 64,
  "layers": 2,
  "heads": 4,
  "eval_batches": 8,
}
QUICK = {
  "steps": 6,
  "batch_size": 8,
  "seq_len": 16,
  "d_model": 16,
  "layers": 1,
  "heads": 4,
  "eval_batches": 1,
}
VOCAB_MULTIPLE = 8  # the vocabulary is padded to a multiple of this and of the model axis
_HOST_DEVICES = "--xla_force_host_platform_device_count"

Params = Any


# ----------------------------------------------------------------------------- flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m examples.sharded_lm",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--mesh", default="2x4", help="data x model devices (default 2x4)")
  p.add_argument(
    "--parallelism",
    choices=sorted(sharded.RULES),
    default="tp",
    help="logical axis rules (default tp)",
  )
  p.add_argument(
    "--optimizers",
    default="eva,adamw",
    help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default eva,adamw)",
  )
  p.add_argument("--steps", type=int, help="training steps (default 200)")
  p.add_argument("--batch-size", type=int, help="global batch, windows (default 32)")
  p.add_argument("--seq-len", type=int, help="window length (default 64)")
  p.add_argument("--d-model", type=int, help="default 64")
  p.add_argument("--layers", type=int, help="default 2")
  p.add_argument("--heads", type=int, help="default 4; must divide --d-model")
  p.add_argument(
    "--lr",
    type=float,
    default=LEARNING_RATES["eva"],
    help=f"Eva's peak learning rate (default {LEARNING_RATES['eva']})",
  )
  p.add_argument(
    "--adamw-lr",
    type=float,
    default=LEARNING_RATES["adamw"],
    help=f"AdamW's peak learning rate (default {LEARNING_RATES['adamw']})",
  )
  p.add_argument(
    "--kfac-lr",
    type=float,
    default=LEARNING_RATES["kfac"],
    help=f"K-FAC's peak learning rate (default {LEARNING_RATES['kfac']})",
  )
  p.add_argument(
    "--sgd-lr",
    type=float,
    default=LEARNING_RATES["sgd"],
    help=f"SGD's peak learning rate (default {LEARNING_RATES['sgd']})",
  )
  p.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
  p.add_argument(
    "--eval-batches",
    type=int,
    help="test windows: N batches from the test split's start (default 8)",
  )
  p.add_argument(
    "--corpus",
    default=None,
    help="text file or directory (default: $EVA_OPTAX_CORPUS, else the "
    f"fortunes package, else {FALLBACK_CORPUS.name})",
  )
  p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
  p.add_argument(
    "--checkpoint-dir",
    default=None,
    help="save params, optimizer state and step at the end in DIR/<optimizer>",
  )
  p.add_argument(
    "--resume", action="store_true", help="restore from --checkpoint-dir and train on to --steps"
  )
  p.add_argument(
    "--stop-at",
    type=int,
    default=None,
    help="stop after step N of the --steps schedule (saving a checkpoint with "
    "--checkpoint-dir, for --resume): a run in parts",
  )
  p.add_argument(
    "--out",
    default=None,
    help="write the results as JSON ('{process}' is replaced by the process "
    "id; without it only process 0 writes)",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="a tiny run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
  )
  p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  p.add_argument("--num-processes", type=int, default=1, help="default 1")
  p.add_argument("--process-id", type=int, default=0, help="default 0")
  args = p.parse_args(argv)
  for name, value in (QUICK if args.quick else SIZES).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  try:
    args.mesh_shape = tuple(int(n) for n in args.mesh.lower().split("x"))
  except ValueError:
    args.mesh_shape = ()
  if len(args.mesh_shape) != 2 or min(args.mesh_shape) < 1:
    p.error(f"--mesh must be DATAxMODEL, e.g. 2x4, got {args.mesh!r}")
  args.optimizer_keys = [k.strip().lower() for k in args.optimizers.split(",") if k.strip()]
  unknown = sorted(set(args.optimizer_keys) - set(OPTIMIZERS))
  if unknown or not args.optimizer_keys:
    p.error(
      f"--optimizers: unknown {unknown or args.optimizers!r}; choose from {','.join(OPTIMIZERS)}"
    )
  for name in (
    "steps",
    "batch_size",
    "seq_len",
    "d_model",
    "layers",
    "heads",
    "eval_batches",
    "num_processes",
  ):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be at least 1")
  for name in ("lr", "adamw_lr", "sgd_lr", "kfac_lr"):
    if not getattr(args, name) > 0:
      p.error(f"--{name.replace('_', '-')} must be positive")
  if args.d_model % args.heads:
    p.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
  data, model = args.mesh_shape
  rules = dict(sharded.RULES[args.parallelism])
  for logical, size, flag in (
    ("heads", args.heads, "--heads"),
    ("mlp", 4 * args.d_model, "4 x --d-model"),
    ("embed", args.d_model, "--d-model"),
  ):
    axis = rules.get(logical)
    if axis is not None and size % {"data": data, "model": model}[axis]:
      p.error(
        f"{args.parallelism}: {flag} ({size}) is split over the mesh's {axis} "
        f"axis ({args.mesh}): it must be a multiple of its size"
      )
  if args.batch_size % args.mesh_shape[0]:
    p.error(
      f"--batch-size {args.batch_size} must be a multiple of the mesh's data "
      f"axis ({args.mesh_shape[0]})"
    )
  if args.num_processes > 1 and args.coordinator is None:
    p.error("--num-processes > 1 needs --coordinator HOST:PORT")
  if not 0 <= args.process_id < args.num_processes:
    p.error(f"--process-id must lie in [0, {args.num_processes})")
  if args.resume and args.checkpoint_dir is None:
    p.error("--resume needs --checkpoint-dir")
  return args


def start_devices(args: argparse.Namespace) -> None:
  """Before any device is touched: the host's device count and, for several processes,
  ``jax.distributed.initialize`` with Gloo as the CPU collectives."""
  flags = os.environ.get("XLA_FLAGS", "")
  if _HOST_DEVICES not in flags:  # no effect once a backend has started (as under pytest)
    per_process = max(1, args.mesh_shape[0] * args.mesh_shape[1] // args.num_processes)
    os.environ["XLA_FLAGS"] = f"{flags} {_HOST_DEVICES}={per_process}".strip()
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


# ----------------------------------------------------------------------------- data


def load_text(corpus: str | None) -> tuple[np.ndarray, np.ndarray, int, str]:
  """``(train ids, test ids, vocabulary size, description)``; README.md when no corpus."""
  try:
    text, description = datasets.text_corpus(corpus)
  except FileNotFoundError:
    if corpus is not None:
      raise
    text, description = datasets.text_corpus(FALLBACK_CORPUS)
    description += " (no fortunes corpus found: the repository's README instead)"
  vocabulary = datasets.char_vocabulary(text)
  train, test = datasets.split_text(datasets.encode(text, vocabulary), TEST_FRACTION)
  return train, test, len(vocabulary), description


def padded_vocabulary(size: int, model_axis: int) -> int:
  """``size`` rounded up so that the vocabulary splits over the model axis (the same for
  every mesh whose model axis divides 8, so that checkpoints move between them)."""
  multiple = math.lcm(VOCAB_MULTIPLE, model_axis)
  return -(-size // multiple) * multiple


def train_windows(
  ids: np.ndarray, seq_len: int, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
  """Batches of ``seq_len + 1`` characters, epoch after epoch, the same on every process."""
  rng = np.random.default_rng(seed)
  while True:
    for inputs, targets in datasets.sequence_batches(ids, seq_len, batch_size, rng):
      yield np.concatenate([inputs, targets[:, -1:]], axis=1)


def held_out_batches(
  ids: np.ndarray, seq_len: int, batch_size: int, batches: int
) -> list[np.ndarray]:
  """Whole batches of test windows (``seq_len + 1`` characters) from the split's start."""
  inputs, targets = eval_windows(ids, seq_len, batches * batch_size)
  windows = np.concatenate([inputs, targets[:, -1:]], axis=1)
  count = len(windows) // batch_size
  if count == 0:
    raise SystemExit(
      f"{len(ids)} test characters are too few for one batch of "
      f"{batch_size} windows of {seq_len + 1}"
    )
  return [windows[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def global_batch(windows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """``windows`` as one array over the mesh; each process fills its own devices' rows."""
  return jax.make_array_from_callback(windows.shape, sharding, lambda index: windows[index])


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Setup:
  """The model on a mesh: what every optimizer of a run shares."""

  model: sharded.Decoder
  mesh: Mesh
  rules: Any
  loss_fn: Callable[[Params, jax.Array], jax.Array]
  param_sharding: Any  # a NamedSharding per parameter
  batch_sharding: NamedSharding
  abstract_params: Any  # jax.ShapeDtypeStructs, placed
  abstract_tokens: jax.ShapeDtypeStruct  # one global batch, placed
  init: Callable[[jax.Array], Params]  # key -> params, jitted onto the mesh
  evaluate: Callable[[Params, jax.Array], jax.Array]  # jitted loss

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """The mesh and the logical axis rules, for tracing the model."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def make_setup(args: argparse.Namespace, mesh: Mesh, rules: Any, vocab: int) -> Setup:
  """The decoder of the flags on ``mesh``: parameter shardings from the logical names."""
  model = sharded.Decoder(
    vocab, args.d_model, args.heads, 4 * args.d_model, args.layers, max_len=args.seq_len
  )
  dummy = jnp.zeros((1, args.seq_len), jnp.int32)
  batch_sharding = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    param_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  init = lambda key: nn.unbox(model.init(key, dummy)["params"])
  loss_fn = sharded.next_token_loss(model)
  return Setup(
    model=model,
    mesh=mesh,
    rules=rules,
    loss_fn=loss_fn,
    param_sharding=param_sharding,
    batch_sharding=batch_sharding,
    abstract_params=abstract_like(nn.unbox(boxed), param_sharding),
    abstract_tokens=jax.ShapeDtypeStruct(
      (args.batch_size, args.seq_len + 1), jnp.int32, sharding=batch_sharding
    ),
    init=jax.jit(init, out_shardings=param_sharding),
    evaluate=jax.jit(
      loss_fn, in_shardings=(param_sharding, batch_sharding), out_shardings=NamedSharding(mesh, P())
    ),
  )


def abstract_like(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct``\\ s of ``tree`` placed with ``shardings``."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
    tree,
    shardings,
  )


# ----------------------------------------------------------------------------- optimizers


def learning_rate(args: argparse.Namespace, key: str) -> float:
  return {"eva": args.lr, "adamw": args.adamw_lr, "sgd": args.sgd_lr, "kfac": args.kfac_lr}[key]


def make_optimizer(
  setup: Setup, key: str, args: argparse.Namespace
) -> tuple[Spec, optax.GradientTransformation, Any]:
  """``(spec, tx, state shardings)``: the optimizer ``key`` on the warm-up + cosine
  schedule, and a ``NamedSharding`` per leaf of its state.

  ``eva_optax.state_shardings`` places Eva's statistics along the kernels' axes (split
  further over the devices the kernel leaves), AdamW's moments like the parameters.
  """
  spec = SPEC_BY_KEY[key]
  schedule = warmup_cosine(learning_rate(args, key), args.steps)
  tx = spec.build(schedule, Options(weight_decay=args.weight_decay))
  return spec, tx, eva_optax.state_shardings(tx, setup.abstract_params, setup.param_sharding)


def make_step(
  spec: Spec,
  tx: optax.GradientTransformation,
  loss_fn: Callable[..., jax.Array],
  shardings: tuple[Any, Any, NamedSharding],
) -> Callable[..., Any]:
  """``(params, opt_state, tokens) -> (params, opt_state, loss)``, jitted on the mesh."""
  param_sharding, state_sharding, batch_sharding = shardings
  replicated = NamedSharding(batch_sharding.mesh, P())

  def step(params: Params, opt_state: Any, tokens: jax.Array) -> tuple[Params, Any, jax.Array]:
    # What the capture computes is read from the optimizer's state (none: a plain gradient).
    statistics = eva_optax.statistics_needed(opt_state)
    if not statistics:
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      # K-FAC: A and G only on the steps whose update averages them.
      gate = {}
      if eva_optax.has_factor_gate(opt_state):
        gate["factors_due"] = eva_optax.factors_due(opt_state)
      grad_fn = eva_optax.value_and_grad(
        loss_fn, statistics=statistics, **dict(spec.capture_options)
      )
      loss, grads, stats = grad_fn(params, tokens, **gate)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(
    step,
    in_shardings=(param_sharding, state_sharding, batch_sharding),
    out_shardings=(param_sharding, state_sharding, replicated),
    donate_argnums=(0, 1),
  )


# ----------------------------------------------------------------------------- checkpoints


def save(directory: Path, step: int, params: Params, opt_state: Any, meta: dict[str, Any]) -> None:
  """Save params, optimizer state and ``step`` (orbax; every process calls it)."""
  arrays = {"params": params, "opt_state": opt_state, "step": np.int32(step)}
  records.save_checkpoint(directory, step, arrays, {**meta, "step": step})


def restore(
  directory: Path, params: Any, opt_state: Any, param_sharding: Any, state_sharding: Any
) -> tuple[Params, Any, int, dict[str, Any]] | None:
  """The latest checkpoint in ``directory`` placed with the given shardings, whatever the
  mesh it was saved from: ``(params, opt_state, step, meta)``, or None when there is none.

  ``params`` and ``opt_state`` give the shapes (arrays or ``jax.ShapeDtypeStruct``\\ s).
  """
  mesh = jax.tree.leaves(param_sharding)[0].mesh
  like = {
    "params": abstract_like(params, param_sharding),
    "opt_state": abstract_like(opt_state, state_sharding),
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
  }
  found = records.restore_checkpoint(directory, like)
  if found is None:
    return None
  arrays, meta = found
  return arrays["params"], arrays["opt_state"], int(arrays["step"]), meta


# ----------------------------------------------------------------------------- training


def fingerprint(args: argparse.Namespace, key: str) -> dict[str, Any]:
  """The settings a resumed run must share with the saved one (not the mesh)."""
  names = (
    "steps",
    "batch_size",
    "seq_len",
    "d_model",
    "layers",
    "heads",
    "weight_decay",
    "seed",
    "corpus",
  )
  return {"optimizer": key, "lr": learning_rate(args, key), **{n: getattr(args, n) for n in names}}


def train_one(
  key: str,
  args: argparse.Namespace,
  setup: Setup,
  train_ids: np.ndarray,
  test_batches: list[np.ndarray],
  log: Callable[[str], None],
) -> dict[str, Any]:
  """Train one optimizer on the mesh; its numbers (losses, step time, collectives), its
  final parameters and state."""
  spec, tx, state_sharding = make_optimizer(setup, key, args)
  directory = Path(args.checkpoint_dir, key) if args.checkpoint_dir else None
  found = None
  if args.resume:
    abstract_state = jax.eval_shape(tx.init, setup.abstract_params)
    found = restore(
      directory, setup.abstract_params, abstract_state, setup.param_sharding, state_sharding
    )
    if found is None:
      log(f"{spec.name}: no checkpoint in {directory}, starting afresh")
  if found is None:
    start, losses = 0, []
    with setup.context():
      params = setup.init(jax.random.key(args.seed))
      opt_state = jax.jit(tx.init, out_shardings=state_sharding)(params)
  else:
    params, opt_state, start, meta = found
    saved = {k: meta.get(k) for k in fingerprint(args, key)}
    if saved != fingerprint(args, key):
      differ = {k: (v, saved[k]) for k, v in fingerprint(args, key).items() if saved[k] != v}
      raise SystemExit(
        f"{directory}: saved with other settings (this run's, the checkpoint's): {differ}"
      )
    losses = list(meta["losses"])
    log(f"{spec.name}: resumed at step {start} from {directory}")
  with setup.context():
    step = make_step(
      spec, tx, setup.loss_fn, (setup.param_sharding, state_sharding, setup.batch_sharding)
    )
    compiled = step.lower(params, opt_state, setup.abstract_tokens).compile()

  stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
  batches = train_windows(train_ids, args.seq_len, args.batch_size, args.seed)
  for _ in range(start):  # the batches the saved run has seen
    next(batches)
  times = []
  for _ in range(start, stop):
    tokens = global_batch(next(batches), setup.batch_sharding)
    begin = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, tokens)
    losses.append(float(loss))  # waits for the step
    times.append(time.perf_counter() - begin)
  with setup.context():
    test_loss = float(
      np.mean(
        [float(setup.evaluate(params, global_batch(b, setup.batch_sharding))) for b in test_batches]
      )
    )
  if directory is not None:
    save(directory, len(losses), params, opt_state, {**fingerprint(args, key), "losses": losses})
  return {
    "optimizer": spec.name,
    "lr": learning_rate(args, key),
    "steps": len(losses),
    "train_loss": float(np.mean(losses[-TRAIN_WINDOW:])) if losses else float("nan"),
    "test_loss": test_loss,
    # The first step after compilation runs on cold caches: left out when there are more.
    "step_ms": 1e3 * statistics.median(times[1:] or times) if times else float("nan"),
    "collectives": dict(compiled_ops.count_collectives(compiled)),
    "losses": losses,
    "params": params,
    "opt_state": opt_state,
  }


def table(results: Sequence[dict[str, Any]]) -> str:
  """A readable table of the results."""
  kinds = compiled_ops.COLLECTIVES
  header = ["optimizer", "lr", "train loss", "test loss", "step ms", *kinds]
  rows = [
    [
      r["optimizer"],
      f"{r['lr']:g}",
      f"{r['train_loss']:.4f}",
      f"{r['test_loss']:.4f}",
      f"{r['step_ms']:.1f}",
      *(str(r["collectives"][k]) for k in kinds),
    ]
    for r in results
  ]
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  line = lambda row: "  ".join(
    c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
  )
  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Train every selected optimizer; return their results (with final params and state)."""
  args = parse_args(argv)
  start_devices(args)
  prefix = f"[process {jax.process_index()}] " if args.num_processes > 1 else ""

  def log(message: str) -> None:
    print(prefix + message, flush=True)

  mesh = sharded.make_mesh(args.mesh_shape)
  rules = sharded.RULES[args.parallelism]
  try:
    train_ids, test_ids, vocab, description = load_text(args.corpus)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(str(e)) from None
  if datasets.sequence_batches_per_epoch(len(train_ids), args.seq_len, args.batch_size) == 0:
    raise SystemExit(f"{len(train_ids)} training characters are too few for one batch")
  padded = padded_vocabulary(vocab, args.mesh_shape[1])
  test_batches = held_out_batches(test_ids, args.seq_len, args.batch_size, args.eval_batches)
  log(f"{description}; vocabulary {vocab}, padded to {padded}")
  log(
    f"mesh {args.mesh_shape[0]}x{args.mesh_shape[1]} (data x model), {args.parallelism} "
    f"rules, {jax.process_count()} process(es), {jax.device_count()} "
    f"{jax.devices()[0].platform} devices; {args.layers} layers, d_model {args.d_model}, "
    f"{args.heads} heads; batch {args.batch_size} x {args.seq_len}, {args.steps} steps"
  )

  setup = make_setup(args, mesh, rules, padded)
  results = [
    train_one(key, args, setup, train_ids, test_batches, log) for key in args.optimizer_keys
  ]
  for line in table(results).splitlines():
    log(line)
  if args.out is not None and ("{process}" in args.out or jax.process_index() == 0):
    path = Path(args.out.replace("{process}", str(jax.process_index())))
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = (
      "optimizer",
      "lr",
      "steps",
      "train_loss",
      "test_loss",
      "step_ms",
      "collectives",
      "losses",
    )
    record = {
      "mesh": args.mesh,
      "parallelism": args.parallelism,
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      "results": [{k: r[k] for k in keep} for r in results],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return results


if __name__ == "__main__":
  main()
