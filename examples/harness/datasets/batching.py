"""Minibatches of aligned arrays (:func:`batches`) and a fixed validation split
(:func:`holdout`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def batches(
  arrays: Sequence[np.ndarray],
  batch_size: int,
  *,
  rng: np.random.Generator | None = None,
  drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, ...]]:
  """Yield tuples of aligned minibatches of ``arrays`` (one pass = one epoch).

  Args:
    arrays: arrays with the same leading dimension.
    batch_size: samples per batch.
    rng: when given, the samples are visited in a random order drawn from it.
    drop_last: drop the final incomplete batch (keeps shapes static under ``jit``).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not arrays:
    raise ValueError("batches() needs at least one array")
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
  order = rng.permutation(n) if rng is not None else np.arange(n)
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    yield tuple(a[idx] for a in arrays)


HOLDOUT_SEED = 0


def holdout(
  arrays: Sequence[np.ndarray], fraction: float
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """Split aligned ``arrays`` into ``(train, validation)``: ``round(n * fraction)`` samples,
  drawn once with a fixed generator (``HOLDOUT_SEED``), are the validation split.

  The same samples are held out whatever the run's seed, so that every point of a
  hyperparameter search is scored on the same data; the order within each split is kept.

  Raises:
    ValueError: ``fraction`` not in (0, 1), or a split would be empty.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
  n = len(arrays[0])
  n_validation = int(round(n * fraction))
  if n_validation == 0 or n_validation == n:
    raise ValueError(
      f"a validation fraction of {fraction} of {n} samples leaves an empty "
      f"split ({n - n_validation} train, {n_validation} validation)"
    )
  held = np.zeros(n, dtype=bool)
  held[np.random.default_rng(HOLDOUT_SEED).permutation(n)[:n_validation]] = True
  return tuple(a[~held] for a in arrays), tuple(a[held] for a in arrays)
