"""Command line shared by the examples, and the run of every selected optimizer.

The selected optimizers train interleaved (:func:`examples.harness.training.interleave`):
``--chunk`` steps of one, then of the next, round-robin, each with its own parameters,
optimizer state and batch-order generator, so that a burst of load on a shared machine
does not land on one of them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from . import datasets, report, targets
from .optimizers import SPECS, Options, parse_keys
from .training import Result, RunConfig, Task, Trainer, interleave


def parser(
  doc: str,
  *,
  epochs: int,
  batch_size: int,
  out: str,
  optimizers: str,
  helps: dict[str, str] | None = None,
  prog: str | None = None,
  eval_every: int = 0,
) -> argparse.ArgumentParser:
  """The common flags; an example adds its own before :func:`parse`.

  ``eval_every`` is the example's default of ``--eval-every`` (0: at the end of every
  epoch only).

  ``helps`` rewords common flags for an example, keyed by flag (``{"--train-limit":
  "use the first N characters"}``); ``prog`` is the command shown in the usage line
  (``"python -m examples.classifier"``).
  """
  p = argparse.ArgumentParser(
    prog=prog,
    description=doc.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--optimizers",
    default=optimizers,
    help=f"comma-separated subset of {','.join(s.key for s in SPECS)} (default {optimizers})",
  )
  p.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
  p.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
  p.add_argument(
    "--lr",
    type=float,
    default=None,
    help="learning rate of every selected optimizer (default: each one's own)",
  )
  for s in SPECS:
    p.add_argument(f"--lr-{s.key}", type=float, default=None, help=f"{s.name} learning rate")
  p.add_argument(
    "--damping",
    type=float,
    default=None,
    help="damping of the optimizers that have one (default: each one's own)",
  )
  p.add_argument(
    "--kl-clip",
    type=float,
    default=None,
    help="KL clip of the optimizers that have one (default: each one's own)",
  )
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=5e-4)
  p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
  p.add_argument("--data-dir", default=None, help="directory of the data set's files")
  p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
  p.add_argument("--test-limit", type=int, default=None, help="use the first N test examples")
  p.add_argument(
    "--validation-fraction",
    type=float,
    default=0.0,
    help="hold out this fraction of the training set and evaluate on it "
    "instead of the test set (the tuning protocol's validation split; "
    "default 0: evaluate on the test set)",
  )
  p.add_argument("--out", default=out, help=f"output directory (default {out})")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue an interrupted run from the checkpoints in --out (and keep saving them)",
  )
  saving = p.add_mutually_exclusive_group()
  saving.add_argument(
    "--checkpoint",
    action="store_true",
    help="save every optimizer's state after each epoch into "
    "--out/checkpoints (orbax, the latest epoch), for --resume; "
    "by default nothing is saved",
  )
  saving.add_argument(
    "--no-checkpoint",
    action="store_true",
    help="save no checkpoints (the default; kept for old command lines)",
  )
  p.add_argument(
    "--reach-window",
    type=int,
    default=10,
    help="steps averaged for the time to reach SGD's final training loss",
  )
  p.add_argument(
    "--eval-every",
    type=int,
    default=eval_every,
    help="evaluate the test set every N steps as well as after every epoch "
    f"(0: after every epoch only; default {eval_every})",
  )
  p.add_argument(
    "--chunk", type=int, default=10, help="the optimizers train in turn, N steps each (default 10)"
  )
  for flag, text in (helps or {}).items():
    dest = flag.lstrip("-").replace("-", "_")
    action = next((a for a in p._actions if a.dest == dest), None)
    if action is None:
      raise ValueError(f"helps: {flag} is not a common flag")
    action.help = text
  return p


def require_at_least(
  p: argparse.ArgumentParser,
  args: argparse.Namespace,
  names: Sequence[str],
  minimum: int = 1,
) -> None:
  """Exit with an error naming the flag if one of ``names`` (when set) is below ``minimum``."""
  for name in names:
    value = getattr(args, name)
    if value is not None and value < minimum:
      p.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parse and check the common flags (errors name the flag)."""
  args = p.parse_args(argv)
  require_at_least(p, args, ("epochs", "batch_size", "reach_window", "chunk"))
  require_at_least(p, args, ("eval_every",), minimum=0)
  if not 0.0 <= args.validation_fraction < 1.0:
    p.error(f"--validation-fraction must lie in [0, 1), got {args.validation_fraction}")
  for name in ("lr", "damping", "kl_clip"):
    value = getattr(args, name)
    if value is not None and not value > 0:
      p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
  try:
    args.specs = parse_keys(args.optimizers)
  except ValueError as e:
    p.error(str(e))
  return args


def evaluation_split(
  args: argparse.Namespace,
  train: tuple[np.ndarray, ...],
  load_test: Callable[[], tuple[np.ndarray, ...]],
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], str]:
  """``(train, evaluation, split name)``: with ``--validation-fraction`` the evaluation
  arrays are held out of ``train`` (:func:`datasets.holdout`; the test set is not read),
  else they are ``load_test()``, the test set."""
  if args.validation_fraction:
    train, validation = datasets.holdout(train, args.validation_fraction)
    return train, validation, "validation"
  return train, load_test(), "test"


def learning_rate(args: argparse.Namespace, key: str, task: Task) -> float:
  """``--lr-<key>``, else ``--lr``, else the task's default for ``key``."""
  specific = getattr(args, f"lr_{key.replace('-', '_')}")
  if specific is not None:
    return specific
  if args.lr is not None:
    return args.lr
  if key not in task.default_lrs:
    raise SystemExit(f"{task.name}: no default learning rate for {key}; pass --lr-{key}")
  return task.default_lrs[key]


# Flags that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = frozenset(
  {
    "optimizers",
    "specs",
    "out",
    "resume",
    "checkpoint",
    "no_checkpoint",
    "data_dir",
    "reach_window",
    "chunk",
  }
)


def fingerprint(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
  """The settings a resumed run must share with the checkpoint (every flag, the
  example's own included, except output, data location and the optimizer selection;
  learning rates are checked per optimizer)."""
  return tuple(
    sorted(
      (k, v)
      for k, v in vars(args).items()
      if k not in RESUMABLE_CHANGES and not (k == "lr" or k.startswith("lr_"))
    )
  )


def checkpoint_dir(args: argparse.Namespace) -> Path | None:
  """Where checkpoints go: ``--out`` with ``--checkpoint`` or ``--resume``, else nowhere."""
  return Path(args.out) if args.checkpoint or args.resume else None


def run(task: Task, args: argparse.Namespace, title: str | None = None) -> list[Result]:
  """Train every selected optimizer on ``task``, print and write the report."""
  start = time.perf_counter()
  title = title or task.name
  print(
    f"{title}: {task.description}; {task.steps_per_epoch} steps/epoch, {args.epochs} "
    f"epochs, device {jax.devices()[0].platform}"
  )
  options = Options(args.momentum, args.weight_decay, args.damping, args.kl_clip)
  out = Path(args.out)
  config = RunConfig(
    epochs=args.epochs,
    seed=args.seed,
    out=checkpoint_dir(args),
    resume=args.resume,
    fingerprint=fingerprint(args),
    eval_every=args.eval_every,
  )
  params, model_state = task.init(jax.random.PRNGKey(args.seed))
  trainers = [
    Trainer(task, spec, learning_rate(args, spec.key, task), options, params, model_state, config)
    for spec in args.specs
  ]
  results = interleave(trainers, args.chunk)
  value = targets.set_times_to_target(results, task.target, args.reach_window)
  settings = {k: v for k, v in vars(args).items() if k != "specs"}
  _, paths = report.write_all(
    results,
    out,
    title,
    task.target,
    value,
    settings,
    window=args.reach_window,
    labels=task.metric_labels,
  )
  print()
  print(
    report.summary_table(
      results, task.target, value, args.reach_window, details=str(out / "results.md")
    )
  )
  print(f"wrote {', '.join(str(p) for p in paths)} (total {time.perf_counter() - start:.0f}s)")
  return results
