"""Data-parallel training of a small CNN on Fashion-MNIST with SGD or Eva, on one or more hosts.

The model is a small Flax Linen classifier: Conv 32 3x3 -> ReLU -> 2x2 average pool ->
Conv 64 3x3 -> ReLU -> 2x2 average pool -> Dense 128 -> ReLU -> Dense 10, trained with the
mean softmax cross-entropy, weight decay 5e-4, momentum 0.9 and a learning rate decayed
linearly to 0 over the run:

- SGD: ``jax.value_and_grad`` and
  ``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))``;
- Eva: ``eva_optax.value_and_grad`` and ``eva_optax.eva(lr, momentum=0.9, weight_decay=5e-4)``.

Data parallelism is plain ``jax.jit`` over a one-axis ``jax.sharding.Mesh`` (axis
``'data'``): every global batch is a ``jax.Array`` split along its first axis over the
devices (``NamedSharding(mesh, P('data'))``), the parameters and the optimizer state are
replicated (``NamedSharding(mesh, P())``). XLA inserts the all-reduces. Every mean in the
loss, and so every statistic Eva captures (ā, ḡ), is a mean over the *global* batch, exactly
as on one device: the training step is the same code as in the single-device README
example, with shardings on its arguments and nothing else (no ``pmean``, no ``axis_name``).

Several hosts. With ``--num-processes N`` (N > 1) every process first calls
``jax.distributed.initialize(--coordinator, N, --process-id)`` (before any other JAX call),
with Gloo as the CPU collectives implementation. The mesh then holds the ``--devices``
first local devices of every process, in process order; every process draws the same
shuffled order of the training set (``--seed``), reads only its own contiguous slice of
each global batch (``--batch-size`` / N samples) and turns it into the global array with
``jax.make_array_from_process_local_data``. The loss and the test accuracy are replicated
results, the same on every process.

Per epoch it prints the mean training loss, the test loss and accuracy, and the training
time; ``--out`` writes these metrics as JSON (with several processes only process 0 writes
it, unless the path contains ``{process}``, which is replaced by the process id).

Usage (one host; on a CPU, ``XLA_FLAGS`` splits the host into several XLA devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m examples.multi_device --optimizer eva --epochs 2
    python -m examples.multi_device --optimizer sgd --epochs 1 --train-limit 10000   # quick

Two processes on one machine, 4 CPU devices each (8 in the mesh). This works here
(jax 0.10.2, 2-core CPU; the Gloo collectives are jax's default CPU implementation in this
version, the script sets them explicitly). Run, from the repository root::

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python -m examples.multi_device --optimizer eva --epochs 1 --train-limit 2048 \\
        --test-limit 1024 --coordinator localhost:12355 --num-processes 2 --process-id 0 &
    python -m examples.multi_device --optimizer eva --epochs 1 --train-limit 2048 \\
        --test-limit 1024 --coordinator localhost:12355 --num-processes 2 --process-id 1
    wait

which printed (process 1; process 0 printed the same numbers, with ``[process 0]``;
Gloo's own "[Gloo] Rank k is connected to 7 peer ranks" lines left out)::

    [process 1] Fashion-MNIST CNN, eva: 2048 train / 1024 test images, global batch 256 over 8 devices (2 process(es) x 4 cpu devices), 8 steps/epoch, lr 0.05
    [process 1] epoch 1: train loss 1.613150  test loss 1.0860  test accuracy 55.66%  time 6.6s

The same command in one process with 8 devices (``--xla_force_host_platform_device_count=8``,
no ``--num-processes``), or with 1 device, printed the same loss and accuracy to every digit
shown: the data-parallel step is the single-device step.

On several machines the same command runs once per machine, ``--coordinator`` being the
address of process 0's machine and ``XLA_FLAGS`` left out on GPUs or TPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import eva_optax
from examples.harness import datasets

Params = Any
OptState = Any
Step = Callable[..., tuple[Params, OptState, jax.Array]]

DATA_AXIS = "data"
NUM_CLASSES = 10
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
IMAGE_SHAPE = (28, 28, 1)
# Mean and standard deviation of the Fashion-MNIST training pixels (scaled to [0, 1]).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
DEFAULT_LR = {"sgd": 0.05, "eva": 0.05}


class CNN(nn.Module):
  """Conv 32 -> pool -> Conv 64 -> pool -> Dense 128 -> Dense 10 (ReLU between)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(NUM_CLASSES)(x)


MODEL = CNN()


def loss_fn(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the (global) batch."""
  logits = MODEL.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_optimizer(
  name: str, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
  """SGD with momentum and weight decay, or Eva with the same tail."""
  if name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(WEIGHT_DECAY),
      optax.sgd(learning_rate, momentum=MOMENTUM),
    )
  if name == "eva":
    return eva_optax.eva(learning_rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  raise ValueError(f"unknown optimizer {name!r}: expected 'sgd' or 'eva'")


def select_devices(per_process: int | None) -> list[jax.Device]:
  """The first ``per_process`` local devices of every process, in process order.

  Raises:
    SystemExit: a process has fewer local devices than asked for.
  """
  available = jax.local_device_count()
  per_process = available if per_process is None else per_process
  if not 1 <= per_process <= available:
    raise SystemExit(
      f"--devices {per_process}: this process has {available} local device(s). On a CPU, "
      f"set XLA_FLAGS=--xla_force_host_platform_device_count={per_process} "
      "before starting Python to split the host into that many devices."
    )
  by_process: dict[int, list[jax.Device]] = {}
  for device in jax.devices():
    by_process.setdefault(device.process_index, []).append(device)
  return [
    device
    for process in sorted(by_process)
    for device in sorted(by_process[process], key=lambda d: d.id)[:per_process]
  ]


def make_mesh(devices: Sequence[jax.Device]) -> Mesh:
  return Mesh(np.array(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def init_state(mesh: Mesh, tx: optax.GradientTransformation, seed: int) -> tuple[Params, OptState]:
  """Parameters and optimizer state, created replicated on the mesh (same on every host)."""

  def init(key: jax.Array) -> tuple[Params, OptState]:
    params = MODEL.init(key, jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    return params, tx.init(params)

  return jax.jit(init, out_shardings=replicated(mesh))(jax.random.key(seed))


def make_train_step(name: str, tx: optax.GradientTransformation, mesh: Mesh) -> Step:
  """``step(params, opt_state, images, labels) -> (params, opt_state, loss)``, jitted.

  The batch comes in sharded over ``'data'``, everything else is replicated; the parameter
  and optimizer-state buffers are donated.
  """
  if name == "eva":
    grad_fn = eva_optax.value_and_grad(loss_fn)

    def step(params, opt_state, images, labels):
      loss, grads, stats = grad_fn(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss

  else:

    def step(params, opt_state, images, labels):
      loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(
    step,
    in_shardings=(replicated(mesh), replicated(mesh), data_sharding(mesh), data_sharding(mesh)),
    out_shardings=replicated(mesh),
    donate_argnums=(0, 1),
  )


def make_eval_step(mesh: Mesh) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``(params, images, labels, mask) -> (summed loss, number correct)`` over the real samples."""

  def evaluate(params, images, labels, mask):
    logits = MODEL.apply({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return jnp.sum(losses * mask), jnp.sum(correct * mask)

  batch = data_sharding(mesh)
  return jax.jit(
    evaluate,
    in_shardings=(replicated(mesh), batch, batch, batch),
    out_shardings=replicated(mesh),
  )


def load_split(
  split: str, data_dir: str | None, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Normalised float32 images (N, 28, 28, 1) and int32 labels of ``split``."""
  images, labels = datasets.fashion_mnist(split, data_dir)  # type: ignore[arg-type]
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  images = (images.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
  return images[..., None], labels.astype(np.int32)


def global_batch(
  sharding: NamedSharding, arrays: Sequence[np.ndarray], indices: np.ndarray
) -> list[jax.Array]:
  """The global batch ``arrays[indices]``, from this process's contiguous slice of it."""
  processes, process = jax.process_count(), jax.process_index()
  local = len(indices) // processes
  mine = indices[process * local : (process + 1) * local]
  return [
    jax.make_array_from_process_local_data(sharding, a[mine], (len(indices), *a.shape[1:]))
    for a in arrays
  ]


def epoch_indices(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Index arrays of the full batches of one shuffled pass (the same on every process)."""
  order = rng.permutation(n)
  for start in range(0, n - n % batch_size, batch_size):
    yield order[start : start + batch_size]


def evaluate(
  eval_step: Callable[..., tuple[jax.Array, jax.Array]],
  params: Params,
  sharding: NamedSharding,
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
) -> tuple[float, float]:
  """Mean test loss and accuracy; the last batch is padded and the padding masked out."""
  n = len(images)
  padded = -(-n // batch_size) * batch_size
  pad = padded - n
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  total_loss = total_correct = 0.0
  for start in range(0, padded, batch_size):
    indices = np.arange(start, start + batch_size)
    batch = global_batch(sharding, (images, labels, mask), indices)
    loss, correct = eval_step(params, *batch)
    total_loss += float(loss)
    total_correct += float(correct)
  return total_loss / n, total_correct / n


def train(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
  """Train and evaluate; returns the metrics written by ``--out``."""
  devices = select_devices(args.devices)
  mesh = make_mesh(devices)
  processes = jax.process_count()
  if args.batch_size % len(devices):
    raise SystemExit(
      f"--batch-size {args.batch_size} is not a multiple of the {len(devices)} devices"
    )

  train_x, train_y = load_split("train", args.data_dir, args.train_limit)
  test_x, test_y = load_split("test", args.data_dir, args.test_limit)
  steps_per_epoch = len(train_x) // args.batch_size
  if steps_per_epoch == 0:
    raise SystemExit(f"{len(train_x)} training images: fewer than one batch")
  total_steps = args.epochs * steps_per_epoch
  lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
  log(
    f"Fashion-MNIST CNN, {args.optimizer}: {len(train_x)} train / {len(test_x)} test "
    f"images, global batch {args.batch_size} over {len(devices)} devices "
    f"({processes} process(es) x {len(devices) // processes} {devices[0].platform} "
    f"devices), {steps_per_epoch} steps/epoch, lr {lr}"
  )

  tx = make_optimizer(args.optimizer, optax.linear_schedule(lr, 0.0, total_steps))
  params, opt_state = init_state(mesh, tx, args.seed)
  batch_sharding = data_sharding(mesh)
  t0 = time.perf_counter()
  step = (
    make_train_step(args.optimizer, tx, mesh)
    .lower(
      params,
      opt_state,
      jax.ShapeDtypeStruct((args.batch_size, *IMAGE_SHAPE), jnp.float32, sharding=batch_sharding),
      jax.ShapeDtypeStruct((args.batch_size,), jnp.int32, sharding=batch_sharding),
    )
    .compile()
  )
  compile_time = time.perf_counter() - t0
  eval_step = make_eval_step(mesh)

  metrics: dict[str, Any] = {
    "optimizer": args.optimizer,
    "learning_rate": lr,
    "devices": len(devices),
    "processes": processes,
    "devices_per_process": len(devices) // processes,
    "platform": devices[0].platform,
    "global_batch_size": args.batch_size,
    "train_size": len(train_x),
    "test_size": len(test_x),
    "steps_per_epoch": steps_per_epoch,
    "compile_time_s": compile_time,
    "epochs": [],
  }
  rng = np.random.default_rng(args.seed)  # the same batch order on every process
  for epoch in range(1, args.epochs + 1):
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(
      epoch_indices(len(train_x), args.batch_size, rng),
      total=steps_per_epoch,
      desc=f"{args.optimizer} epoch {epoch}/{args.epochs}",
      leave=False,
      disable=None if jax.process_index() == 0 else True,
    )
    for indices in bar:
      images, labels = global_batch(batch_sharding, (train_x, train_y), indices)
      params, opt_state, loss = step(params, opt_state, images, labels)
      losses.append(loss)
      if len(losses) % 10 == 0:
        bar.set_postfix(loss=f"{float(loss):.4f}")
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - t0
    train_loss = float(np.mean([float(loss) for loss in losses]))
    test_loss, test_accuracy = evaluate(
      eval_step, params, batch_sharding, test_x, test_y, args.batch_size
    )
    metrics["epochs"].append(
      {
        "epoch": epoch,
        "train_loss": train_loss,
        "last_step_loss": float(losses[-1]),
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "time_s": elapsed,
      }
    )
    log(
      f"epoch {epoch}: train loss {train_loss:.6f}  test loss {test_loss:.4f}  "
      f"test accuracy {100 * test_accuracy:.2f}%  time {elapsed:.1f}s"
    )
  metrics["final_train_loss"] = metrics["epochs"][-1]["train_loss"]
  metrics["final_test_accuracy"] = metrics["epochs"][-1]["test_accuracy"]
  return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m examples.multi_device", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--optimizer", choices=("sgd", "eva"), default="eva")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=256, help="global batch size")
  p.add_argument(
    "--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULT_LR})"
  )
  p.add_argument(
    "--devices", type=int, default=None, help="local devices used per process (default all)"
  )
  p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
  p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
  p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--out", default=None, help="metrics JSON ('{process}' in it: one file per process)"
  )
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  args = p.parse_args(argv)
  if args.epochs < 1:
    p.error("--epochs must be at least 1")
  if args.num_processes > 1 and args.coordinator is None:
    p.error("--num-processes > 1 needs --coordinator host:port")
  if not 0 <= args.process_id < args.num_processes:
    p.error(f"--process-id must be in [0, {args.num_processes})")
  if args.batch_size % args.num_processes:
    p.error("--batch-size must be a multiple of --num-processes")
  return args


def initialize_distributed(args: argparse.Namespace) -> None:
  """``jax.distributed.initialize`` for several processes; must precede any other JAX use."""
  if args.num_processes <= 1:
    return
  # Cross-process collectives on the CPU backend (ignored by GPU and TPU backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  initialize_distributed(args)
  prefix = f"[process {jax.process_index()}] " if args.num_processes > 1 else ""

  def log(message: str) -> None:
    print(prefix + message, flush=True)

  metrics = train(args, log)
  if args.out is not None and ("{process}" in args.out or jax.process_index() == 0):
    path = Path(args.out.replace("{process}", str(jax.process_index())))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return metrics


if __name__ == "__main__":
  main()
