"""The running averages of each layer's captured statistics, checked against its layer.

One update of the averages a layer-wise state keeps
(:mod:`eva_optax._src.preconditioning`): every layer of the update tree must
have statistics of the right shapes, statistics must not come for parameters
the updates lack, and a statistic that is not finite (a NaN/Inf step) or a
factor the capture was told not to compute never enters an average.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from eva_optax._src.layers import LayerSlot, check_stats_match
from eva_optax._src.paths import Path, path_str
from eva_optax._src.running_average import update_running_average
from eva_optax._src.sharded_sums import wall
from eva_optax._src.state_entries import read_entry, write_entry
from eva_optax._src.statistics import FACTORS, LayerStats, WithBiasRow, apart, layer_entries

#: ``{statistic name: {module path: value}}``: a state's statistics, read flat.
ByStatistic = dict[str, dict[Path, Any]]


def check_paths(
  slots: Mapping[Path, LayerSlot],
  entries: Mapping[Path, Any],
  name: str,
  update_paths: set[Path] | None,
) -> None:
  """Every layer of the updates has statistics; no statistics without parameters."""
  missing = [path_str(p) for p in slots if p not in entries]
  if missing:
    raise ValueError(
      f"{name}: no statistics for the layer parameters at {missing} (the stats"
      f" hold {[path_str(p) for p in entries] or 'nothing'}). Pass the stats of"
      " eva_optax.value_and_grad for the same params tree as the updates (the"
      " same nesting, no prefix), from a forward pass that calls these layers."
    )
  if update_paths is None:
    return
  orphans = [
    path_str(p)
    for p, e in entries.items()
    if isinstance(e, LayerStats) and not any(u[: len(p)] == p for u in update_paths)
  ]
  if orphans:
    raise ValueError(
      f"{name}: statistics for {orphans}, but the updates have no parameters"
      " there: the stats come from another model or another nesting of the params"
    )


def update_averages(
  slots: Mapping[Path, LayerSlot],
  stats: Any,
  stored: ByStatistic,
  stat_decay: jax.Array,
  count: jax.Array,
  name: str,
  update_paths: set[Path] | None = None,
  due: jax.Array | None = None,
) -> tuple[ByStatistic, ByStatistic]:
  """Running averages of the statistics named in ``stored``, for every layer.

  A factor with a non-finite entry, or all zeros (not computed, see
  :func:`eva_optax.factors_due`), keeps its layer's old average; each
  non-finite entry of a vector statistic (ā, ḡ) keeps its old value.

  Args:
    slots: the layers of the update tree.
    stats: the captured statistics.
    stored: the state's entries, ``{statistic name: {module path: entry}}``.
    stat_decay: weight of the old average (:mod:`eva_optax.running_average`).
    count: the update count (the first update takes the new values).
    name: the optimizer's name, for error messages.
    update_paths: the leaf paths of the update tree (masked leaves included);
      when given, statistics of a layer with no parameter there are an error.
    due: whether this step averages at all (``stats_every``); ``None``: it does.

  Returns:
    The averages of the preconditioned layers, in the captured shapes (a
    :class:`~eva_optax._src.statistics.WithBiasRow` where the state keeps one),
    and the new state entries (unchanged for layers without statistics this
    step), both ``{statistic name: {module path: ...}}``.
  """
  entries = layer_entries(stats)
  check_paths(slots, entries, name, update_paths)
  layers = [p for p in slots if isinstance(entries.get(p), LayerStats)]
  for path in layers:
    check_stats_match(slots[path], entries[path])
    missing = [n for n in stored if getattr(entries[path], n) is None]
    if missing:
      raise ValueError(
        f"{name} needs the statistics {tuple(stored)}, but {missing} were not"
        " captured: create the gradient function with"
        f" eva_optax.value_and_grad(loss_fn, statistics={tuple(stored)})"
      )
  # The captured values, all at once through a wall for sharding propagation
  # (sharded_sums.wall): the state's split must not reach back into the capture.
  walled = iter(wall([getattr(entries[p], n) for n in stored for p in layers]))
  values: ByStatistic = {n: {} for n in stored}
  new: ByStatistic = {n: dict(entries_n) for n, entries_n in stored.items()}
  for n, entries_n in stored.items():
    for path in layers:
      value = next(walled)
      previous = read_entry(entries_n[path], value.shape, f"{name}: layer {path_str(path)!r}, {n}")
      # Kept apart (a WithBiasRow): averaged part by part, each where it lives.
      parts = apart(value) if isinstance(previous, WithBiasRow) else value
      average = jax.tree.map(
        lambda old, new: update_running_average(old, new, stat_decay, count), previous, parts
      )
      if n in FACTORS:
        # A factor the capture was told not to compute is exactly zero.
        keep = jnp.all(jnp.isfinite(value)) & jnp.any(value != 0)
      else:
        # Entry by entry: elementwise, so it fuses into the average itself
        # instead of adding a reduction per layer to the step.
        keep = jnp.isfinite(value)
      if due is not None:
        keep = keep & due
      average = jax.tree.map(lambda a, b: jnp.where(keep, a, b), average, previous)
      values[n][path] = average
      new[n][path] = write_entry(entries_n[path], average)
  return values, new
