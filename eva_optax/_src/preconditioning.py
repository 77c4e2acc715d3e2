"""The skeleton shared by layer-wise preconditioners: match, precondition, scale.

A layer-wise rule (Eva, and every rule built on captured statistics) only has
to say how one layer's gradient matrix is preconditioned; this module finds the
layers in the update tree, checks the captured statistics against them, keeps
running averages of the statistics, applies the global KL scaling to the
preconditioned layers only, and passes every other parameter through unchanged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

import optax
from jax.sharding import PartitionSpec

from eva_optax._src import kl
from eva_optax._src.hyper import check_period, check_range, value_at
from eva_optax._src.layers import (
  LayerSlot,
  bias_from_vector,
  bias_vector,
  check_stats_match,
  find_layer_slots,
  kernel_from_matrix,
  kernel_matrix,
  reserved_readings,
)
from eva_optax._src.paths import BIAS, KERNEL, Path, flatten_with_paths, nest, path_of, path_str
from eva_optax._src.statistics import (
  FACTORS,
  INPUT_MEAN,
  OUTPUT_GRAD_MEAN,
  STATISTICS,
  KernelLayout,
  LayerStats,
  WithBiasRow,
  apart,
  is_with_bias_row,
  keeps_bias_row_apart,
  layer_entries,
  statistic_shapes,
  stored_shape,
  together,
)
from eva_optax._src.running_average import update_running_average
from eva_optax._src.missing_stats import missing_stats_message
from eva_optax._src.linalg import add_to_diagonal
from eva_optax._src.once_per_mesh import once_per_mesh
from eva_optax._src.sharded_sums import wall, whole
from eva_optax._src.sharding import (
  is_placeholder,
  not_params_shaped,
  params_mesh,
  place,
  spec_of,
  statistic_spec,
)


class LayerGradient(NamedTuple):
  """A layer's gradient as a matrix: kernel ``stack + (in, out)``, bias ``stack + (out,)``."""

  kernel: jax.Array
  bias: jax.Array | None


class Preconditioned(NamedTuple):
  """A preconditioned update ``V`` and ``Σ ⟨V, Ĝ⟩`` over its entries.

  For one layer, ``kernel`` and ``bias`` are arrays (``bias`` ``None`` without
  one); for a group of layers (a rule applied to all layers at once, see
  :func:`layerwise_transformation`), they are tuples with one entry per layer
  and ``update_dot_grad`` is the sum over the group.
  """

  kernel: Any
  bias: Any
  update_dot_grad: jax.Array


class FactorGate(NamedTuple):
  """Part of the state of an optimizer that averages factors (K-FAC, FOOF).

  :func:`factors_due` finds the optimizer by this type, wherever it sits in a
  chained or wrapped state, and the capture computes A and G on exactly the
  steps whose update averages them.

  Attributes:
    due: whether the next update averages the factors (a bool scalar):
      ``count % stats_every == 0`` for the count of that update.
  """

  due: jax.Array


def scale_preconditioned(p: Preconditioned, factor: jax.Array) -> Preconditioned:
  """``factor · V`` and ``factor · ⟨V, Ĝ⟩`` (one layer or a group)."""
  times = lambda x: jax.tree.map(lambda v: v * factor, x)
  return Preconditioned(times(p.kernel), times(p.bias), p.update_dot_grad * factor)


LayerRule = Callable[[LayerGradient, dict[str, jax.Array], jax.Array], Preconditioned]
GroupRule = Callable[
  [Sequence[LayerGradient], Sequence[dict[str, jax.Array]], jax.Array], Preconditioned
]


def each_layer(rule: LayerRule) -> GroupRule:
  """A rule for one layer as a rule for a group: applied to each, dots summed."""

  def group(grads, stats, gamma):
    results = [rule(g, s, gamma) for g, s in zip(grads, stats)]
    return Preconditioned(
      tuple(r.kernel for r in results),
      tuple(r.bias for r in results),
      sum(r.update_dot_grad for r in results),
    )

  return group


def require_stats(stats: Any, name: str) -> None:
  if stats is None:
    # The message names the Linen and NNX routes and the wrapper that dropped
    # the stats, if any (read from the call stack, on this error path only).
    raise ValueError(missing_stats_message(name))


def layout_statistics(
  slot: LayerSlot, layout: KernelLayout, statistics: Sequence[str]
) -> dict[str, tuple[int, ...]]:
  """The shapes of ``statistics`` for the layer of ``slot`` read with ``layout``."""
  shapes = statistic_shapes(*layout.dims(slot.kernel_shape), slot.has_bias)
  return {name: shapes[name] for name in statistics}


def room(
  slot: LayerSlot,
  statistics: Sequence[str],
  shapes: Callable[[KernelLayout], dict[str, tuple[int, ...]]] | None = None,
) -> dict[str, tuple[int, ...]]:
  """The shape of each of a layer's state entries, fixed at ``init``.

  ``shapes(layout)``: the optimizer's entries for a layer of that layout
  (default: its ``statistics``). When every reading the state makes room for
  (:func:`~eva_optax._src.layers.reserved_readings`, judged by the size of
  ``statistics``) gives an entry the same shape, that shape; otherwise a flat
  buffer as long as its largest reading, whose head an update uses
  (:func:`fit`, :func:`put`) once the capture says the layout.
  """
  shapes = shapes or (lambda layout: layout_statistics(slot, layout, statistics))
  size = lambda layout: sum(
    math.prod(s) for s in layout_statistics(slot, layout, statistics).values()
  )
  layouts = reserved_readings(slot.kernel_shape, slot.readings, size) or (slot.layout,)
  options = [shapes(layout) for layout in layouts]
  return {
    n: shape if all(o[n] == shape for o in options) else (max(math.prod(o[n]) for o in options),)
    for n, shape in options[0].items()
  }


def has_room(slot: LayerSlot, layout: KernelLayout, statistics: Sequence[str]) -> bool:
  """Whether the state :func:`room` sets aside for ``slot`` holds ``layout``'s statistics."""
  held = room(slot, statistics)
  wanted = layout_statistics(slot, layout, statistics)
  return all(
    held[n] == shape or (len(held[n]) == 1 and held[n][0] >= math.prod(shape))
    for n, shape in wanted.items()
  )


def stored_zeros(slot: LayerSlot, shape: tuple[int, ...], dtype: Any) -> Any:
  """A zero state entry of ``shape`` for the layer of ``slot``: an array, or a
  :class:`~eva_optax._src.statistics.WithBiasRow` for a square matrix over
  â = [a, 1] (so that its rows split evenly over a mesh)."""
  stack, in_dim, _ = slot.layout.dims(slot.kernel_shape)
  zeros = jnp.zeros(shape, dtype)
  return apart(zeros) if keeps_bias_row_apart(stack, in_dim, slot.has_bias, shape) else zeros


def zero_statistics(slots: dict[Path, LayerSlot], statistics: Sequence[str]) -> dict[str, Any]:
  """Zero running averages of ``statistics`` for every layer, in the shapes of
  :func:`room`: ``{name: tree keyed by module path}``."""
  flat = {p: room(s, statistics) for p, s in slots.items()}
  return {
    n: nest({p: stored_zeros(slots[p], shapes[n], slots[p].dtype) for p, shapes in flat.items()})
    for n in statistics
  }


def flatten_entries(tree: Any) -> list[tuple[Path, Any]]:
  """``(module path, entry)`` of a per-layer state tree (an entry: an array or a
  :class:`~eva_optax._src.statistics.WithBiasRow`)."""
  return flatten_with_paths(tree, is_leaf=is_with_bias_row)


def fit(stored: Any, shape: tuple[int, ...], where: str) -> Any:
  """A state entry as an array of ``shape``: itself (a
  :class:`~eva_optax._src.statistics.WithBiasRow` of that shape stays one), or
  the head of its flat buffer."""
  shape = tuple(shape)
  if stored_shape(stored) == shape:
    return stored
  n = math.prod(shape)
  if stored.ndim != 1 or stored.shape[0] < n:
    raise ValueError(
      f"{where}: the captured layout needs a state entry of shape {shape}, but"
      f" the optimizer state holds {tuple(stored.shape)} (room for the layouts"
      " Flax's layers give these parameters): pass"
      " layouts=eva_optax.layouts_of(stats) to the optimizer, or re-create its"
      " state with tx.init for these parameters"
    )
  return stored[:n].reshape(shape)


def put(stored: Any, value: Any) -> Any:
  """``value`` as the new state entry ``stored`` (which :func:`fit` read it from):
  itself, in the stored form, or at the head of a flat buffer whose tail is zero."""
  if isinstance(stored, WithBiasRow):
    value = value if isinstance(value, WithBiasRow) else apart(value)
    return jax.tree.map(lambda v, s: v.astype(s.dtype), value, stored)
  if tuple(stored.shape) == tuple(value.shape):
    return value.astype(stored.dtype)
  flat = value.reshape(-1).astype(stored.dtype)
  return jnp.pad(flat, (0, stored.shape[0] - flat.shape[0]))


def update_averages(
  slots: dict[Path, LayerSlot],
  stats: Any,
  averages: dict[str, Any],
  stat_decay: jax.Array,
  count: jax.Array,
  who: str,
  update_paths: set[Path] | None = None,
) -> tuple[dict[Path, dict[str, jax.Array]], dict[str, Any]]:
  """Running averages of the statistics named in ``averages``, for every layer.

  Statistics that are not finite (a NaN/Inf step) never enter an average: a
  factor with a non-finite entry keeps its layer's old average; each
  non-finite entry of a vector statistic (ā, ḡ) keeps its old value.

  Args:
    slots: the layers of the update tree.
    stats: the captured statistics.
    averages: ``{statistic name: running-average tree keyed by module path}``.
    stat_decay: weight of the old average (:mod:`eva_optax.running_average`).
    count: the update count (the first update takes the new values).
    who: the optimizer's name, for error messages.
    update_paths: the leaf paths of the update tree (masked leaves included);
      when given, statistics of a layer with no parameter there are an error.

  Returns:
    Per preconditioned layer, the averaged statistics by name; and the new
    running-average trees (unchanged for layers without statistics this step).
  """
  entries = layer_entries(stats)
  old = {name: dict(flatten_entries(tree)) for name, tree in averages.items()}
  new = {name: dict(flat) for name, flat in old.items()}
  averaged: dict[Path, dict[str, jax.Array]] = {}
  missing = [path_str(p) for p in slots if p not in entries]
  if missing:
    raise ValueError(
      f"{who}: no statistics for the layer parameters at {missing} (the stats"
      f" hold {[path_str(p) for p in entries] or 'nothing'}). Pass the stats of"
      " eva_optax.value_and_grad for the same params tree as the updates (the"
      " same nesting, no prefix), from a forward pass that calls these layers."
    )
  if update_paths is not None:
    orphans = [
      path_str(p)
      for p, e in entries.items()
      if isinstance(e, LayerStats) and not any(u[: len(p)] == p for u in update_paths)
    ]
    if orphans:
      raise ValueError(
        f"{who}: statistics for {orphans}, but the updates have no parameters"
        " there: the stats come from another model or another nesting of the params"
      )
  # The captured values, all at once through a wall for sharding propagation
  # (sharded_sums.wall): the state's split must not reach back into the capture.
  names = {
    path: [n for n in averages if getattr(entries[path], n, None) is not None]
    for path in slots
    if isinstance(entries.get(path), LayerStats)
  }
  walled = iter(wall([getattr(entries[p], n) for p, ns in names.items() for n in ns]))
  captured = {p: {n: next(walled) for n in ns} for p, ns in names.items()}
  for path, slot in slots.items():
    entry = entries.get(path)
    if not isinstance(entry, LayerStats):
      continue
    check_stats_match(slot, entry)
    missing = [name for name in averages if getattr(entry, name) is None]
    if missing:
      raise ValueError(
        f"{who} needs the statistics {tuple(averages)}, but {missing} were not"
        " captured: create the gradient function with"
        f" eva_optax.value_and_grad(loss_fn, statistics={tuple(averages)})"
      )
    averaged[path] = {}
    for name in averages:
      value, stored = captured[path][name], old[name][path]
      previous = fit(stored, value.shape, f"{who}: layer {path_str(path)!r}, {name}")
      # Kept apart (a WithBiasRow): averaged part by part, each where it lives.
      parts = apart(value) if isinstance(previous, WithBiasRow) else value
      average = jax.tree.map(
        lambda old, new: update_running_average(old, new, stat_decay, count), previous, parts
      )
      if name in FACTORS:
        # A factor the capture was told not to compute is exactly zero: it
        # never enters the average (see eva_optax.factors_due).
        keep = jnp.all(jnp.isfinite(value)) & jnp.any(value != 0)
      else:
        # Entry by entry: elementwise, so it fuses into the average itself
        # instead of adding a reduction per layer to the step.
        keep = jnp.isfinite(value)
      average = jax.tree.map(lambda a, b: jnp.where(keep, a, b), average, previous)
      averaged[path][name] = average
      new[name][path] = put(stored, average)
  return averaged, {name: nest(flat) for name, flat in new.items()}


def apply_layerwise(
  updates: Any,
  slots: dict[Path, LayerSlot],
  layers: dict[Path, Any],
  precondition: GroupRule,
  scale: Callable[[jax.Array], jax.Array],
) -> Any:
  """Preconditions the layers named in ``layers``, scales them, passes the rest.

  Args:
    updates: the gradient tree.
    slots: every layer of the tree (:func:`find_layer_slots`).
    layers: per layer to precondition, the statistics ``precondition`` needs.
    precondition: ``(LayerGradients, statistics) -> Preconditioned`` for all
      those layers at once (lists in the order of ``layers``; see
      :func:`each_layer` for a rule written for one layer).
    scale: ``Σ_layers ⟨V, Ĝ⟩ -> ν``, the factor applied to every ``V``.
  """
  if not layers:
    return updates
  leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
  paths = [path_of(keys) for keys, _ in leaves]
  index = {path: i for i, path in enumerate(paths)}
  new = [leaf for _, leaf in leaves]
  grads = []
  for path in layers:
    slot = slots[path]
    k = new[index[path + (KERNEL,)]]
    b = new[index[path + (BIAS,)]] if slot.has_bias else None
    grads.append(
      LayerGradient(
        kernel_matrix(k.astype(slot.dtype), slot.layout),
        None if b is None else bias_vector(b.astype(slot.dtype), slot.layout, slot.kernel_shape),
      )
    )
  result = precondition(grads, list(layers.values()))
  nu = scale(result.update_dot_grad)
  for path, kernel, bias in zip(layers, result.kernel, result.bias):
    slot = slots[path]
    ki = index[path + (KERNEL,)]
    new[ki] = kernel_from_matrix(nu * kernel, slot.layout, new[ki].shape).astype(new[ki].dtype)
    if bias is not None:
      bi = index[path + (BIAS,)]
      new[bi] = bias_from_vector(nu * bias, slot.layout, new[bi].shape, slot.kernel_shape).astype(
        new[bi].dtype
      )
  return jax.tree_util.tree_unflatten(treedef, new)


def kl_scale(
  scaling: str,
  learning_rate: jax.Array | None,
  kl_clip: jax.Array | None,
) -> Callable[[jax.Array], jax.Array]:
  """The ``scale`` argument of :func:`apply_layerwise` for KL clip / normalisation."""
  return lambda total: kl.scale_factor(scaling, total, learning_rate, kl_clip)


def check_layerwise_hyperparameters(
  who: str, learning_rate, damping, kl_clip, stat_decay, scaling: str
) -> None:
  """The argument checks every layer-wise preconditioner shares."""
  kl.check_scaling(scaling)
  if scaling == kl.KL_CLIP and learning_rate is None:
    raise ValueError(f"{who} with scaling='kl_clip' needs learning_rate")
  check_range("learning_rate", learning_rate, low=0.0, low_inclusive=True)
  check_range("damping", damping, low=0.0)
  check_range("kl_clip", kl_clip, low=0.0)
  check_range("stat_decay", stat_decay, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)


#: The state classes of every layer-wise transformation built here.
LAYERWISE_STATES: set[type] = set()


def is_layerwise_state(x: Any) -> bool:
  """Whether ``x`` is the state of a :func:`layerwise_transformation`."""
  return type(x) in LAYERWISE_STATES


def layerwise_state_specs(state: Any, params: Any, split_matrices: bool = True) -> Any:
  """The ``PartitionSpec`` of every leaf of a layer-wise state, from the parameters'.

  ``params``: arrays or ``jax.ShapeDtypeStruct`` leaves carrying their
  ``NamedSharding``. Each statistic follows its kernel
  (:func:`eva_optax._src.sharding.statistic_spec`, read with the layout its
  parameters suggest); a flat buffer sized for several layouts (:func:`room`),
  or a statistic whose shape the suggested layout does not give, is
  replicated, as are the count and the factor gate. A per-layer matrix (a
  factor, an inverse) has its rows split too, unless ``split_matrices`` is
  false: then it is whole on every device of its kernel's stack axes.
  """
  leaves = dict(flatten_with_paths(params))
  slots = find_layer_slots(params)
  kernel_specs = {p: spec_of(leaves.get(p + (KERNEL,))) for p in slots}
  mesh = params_mesh(params)
  mesh_shape = dict(mesh.shape) if mesh is not None else None
  matrix_mesh = mesh_shape if split_matrices else None  # no mesh: the stack axes only
  replicated = PartitionSpec()

  def entry_spec(path: Path, name: str, stored: Any) -> Any:
    slot = slots.get(path)
    if slot is None:
      return jax.tree.map(lambda _: replicated, stored)
    stack = slot.layout.dims(slot.kernel_shape)[0]
    if isinstance(stored, WithBiasRow):  # the rows split, the bias row with the stack
      rows = statistic_spec(
        kernel_specs[path],
        len(slot.kernel_shape),
        slot.layout,
        name,
        matrix_mesh,
        stored.rows.shape[len(stack)],
      )
      return WithBiasRow(
        rows, statistic_spec(kernel_specs[path], len(slot.kernel_shape), slot.layout, name)
      )
    shapes = statistic_shapes(*slot.layout.dims(slot.kernel_shape), slot.has_bias)
    vector = name in (INPUT_MEAN, OUTPUT_GRAD_MEAN)
    rows = len(stack) if not vector else len(stored.shape) - 1
    spec = statistic_spec(
      kernel_specs[path],
      len(slot.kernel_shape),
      slot.layout,
      name,
      mesh_shape if vector else matrix_mesh,
      stored.shape[rows] if len(stored.shape) > rows else None,
    )
    if name in STATISTICS:
      return spec if tuple(stored.shape) == shapes[name] else replicated
    return (
      spec
      if tuple(stored.shape[: len(stack)]) == stack and len(stored.shape) > len(stack)
      else replicated
    )

  def field_specs(field: str, value: Any) -> Any:
    if field == "cache":  # {name: tree keyed by path}
      return {
        n: nest({p: entry_spec(p, n, v) for p, v in flatten_entries(tree)})
        for n, tree in value.items()
      }
    if field in STATISTICS:
      return nest({p: entry_spec(p, field, v) for p, v in flatten_entries(value)})
    return jax.tree.map(lambda _: replicated, value)

  return type(state)(**{f: field_specs(f, getattr(state, f)) for f in state._fields})


def _by_layer(trees: dict[str, Any]) -> dict[Path, dict[str, Any]]:
  """``{name: tree keyed by path}`` → ``{path: {name: array}}``."""
  flat = {n: dict(flatten_entries(t)) for n, t in trees.items()}
  paths = next(iter(flat.values())).keys() if flat else ()
  return {p: {n: flat[n][p] for n in flat} for p in paths}


def layerwise_transformation(
  *,
  who: str,
  state_cls: type,
  statistics: tuple[str, ...],
  precondition: LayerRule | None = None,
  precondition_layers: GroupRule | None = None,
  learning_rate: optax.ScalarOrSchedule | None,
  damping: optax.ScalarOrSchedule,
  kl_clip: optax.ScalarOrSchedule,
  stat_decay: float | jax.Array,
  scaling: str,
  layouts: Any,
  refresh: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]] | None = None,
  refresh_every: int = 1,
  stats_every: int = 1,
  refresh_for: Callable[[LayerSlot, str | None], Callable[..., dict[str, jax.Array]]] | None = None,
  shift_after_refresh: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]
  | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A layer-wise preconditioner from its rule, with everything else shared.

  Per step: running averages of ``statistics`` (updated every ``stats_every``
  steps), optionally a per-layer cache recomputed by ``refresh(averages,
  damping)`` every ``refresh_every`` steps (inverses of K-FAC and FOOF, through
  ``lax.cond`` so one compiled step serves every step), ``precondition`` of
  each captured layer, then the KL clip / normalisation over all of them.

  The rule is given either for one layer (``precondition(grad, statistics,
  damping)``, applied to each layer) or for all the layers of the step at once
  (``precondition_layers(grads, statistics, damping)``, lists in one order):
  the second form lets a rule whose per-layer work is a few small vector
  reductions do them for every layer in one operation (:mod:`eva_optax.segments`).

  ``state_cls`` is a NamedTuple with the fields ``count``, one per statistic
  name, ``cache`` when ``refresh`` is given, and ``gate`` (a
  :class:`FactorGate`) when a statistic is a factor A or G.

  ``refresh_for(slot, kind)``, instead of ``refresh``, gives each layer its
  own refresh (one that depends on the layer's kernel shape, layout and kind,
  ``LayerStats.kind``; ``None`` where only shapes are asked for).
  ``shift_after_refresh(averages, damping)`` (optional, with a refresh) gives
  per statistic a scalar (per stack entry) added to the diagonal of the stored
  average at every refresh step, after the refresh: the authors' K-FAC damps
  its stored factors in place (:func:`eva_optax.scale_by_kfac`).
  """
  if refresh_for is None and refresh is not None:
    refresh_for = lambda slot, kind: refresh  # noqa: E731
  if (precondition is None) == (precondition_layers is None):
    raise TypeError("give exactly one of precondition and precondition_layers")
  group_rule = precondition_layers or each_layer(precondition)
  check_layerwise_hyperparameters(who, learning_rate, damping, kl_clip, stat_decay, scaling)
  for name, every in (("refresh_every", refresh_every), ("stats_every", stats_every)):
    check_period(name, every)
  gated = any(name in FACTORS for name in statistics)
  LAYERWISE_STATES.add(state_cls)

  def by_name(per_layer: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """``{path: {name: array}}`` → ``{name: tree keyed by path}``."""
    names = next(iter(per_layer.values())).keys() if per_layer else ()
    return {n: nest({p: v[n] for p, v in per_layer.items()}) for n in names}

  def cache_shapes_of(slot: LayerSlot, layout: KernelLayout) -> dict[str, Any]:
    zeros = {
      n: jax.ShapeDtypeStruct(s, slot.dtype)
      for n, s in layout_statistics(slot, layout, statistics).items()
    }
    fn = refresh_for(slot._replace(layout=layout), None)
    return jax.eval_shape(lambda a: fn(a, jnp.asarray(1.0, slot.dtype)), zeros)

  def init_fn(params):
    if is_placeholder(params):
      # optax.tree_map_params: the per-layer trees are keyed by module path,
      # not shaped like the parameters.
      marker = not_params_shaped
      fields = dict(count=jnp.zeros([], jnp.int32), **{n: marker() for n in statistics})
      if gated:
        fields["gate"] = FactorGate(jnp.ones([], jnp.bool_))
      if refresh_for is not None:
        fields["cache"] = marker()
      return state_cls(**fields)
    slots = find_layer_slots(params, layouts)
    averages = zero_statistics(slots, statistics)
    fields = dict(count=jnp.zeros([], jnp.int32), **averages)
    if gated:
      fields["gate"] = FactorGate(jnp.ones([], jnp.bool_))  # count 0 averages
    if refresh_for is not None:
      cache = {}
      for p, s in slots.items():
        dtypes = {n: v.dtype for n, v in cache_shapes_of(s, s.layout).items()}
        shapes = room(
          s, statistics, lambda l, s=s: {n: v.shape for n, v in cache_shapes_of(s, l).items()}
        )
        cache[p] = {n: stored_zeros(s, shape, dtypes[n]) for n, shape in shapes.items()}
      fields["cache"] = by_name(cache)
    state = state_cls(**fields)
    return place(params, state, layerwise_state_specs(state, params))

  def update_fn(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    require_stats(stats, who)
    count = state.count
    # Each layer's layout: as given, else as captured (the state made room).
    slots = find_layer_slots(updates, layouts, captured=stats)
    dtype = jnp.result_type(jnp.float32, *[s.dtype for s in slots.values()])
    gamma = value_at(damping, count, dtype)
    old = {name: getattr(state, name) for name in statistics}
    update_paths = {
      p for p, _ in flatten_with_paths(updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    }
    averaged, averages = update_averages(slots, stats, old, stat_decay, count, who, update_paths)
    if isinstance(stats_every, jax.core.Tracer) or int(stats_every) != 1:
      take = count % stats_every == 0
      averages = jax.tree.map(lambda n, o: jnp.where(take, n, o), averages, old)
      current = _by_layer(averages)
      averaged = {
        p: {n: fit(current[p][n], stored_shape(v), who) for n, v in averaged[p].items()}
        for p in averaged
      }
    next_count = optax.safe_increment(count)
    fields = dict(count=next_count, **averages)
    if gated:
      fields["gate"] = FactorGate(next_count % stats_every == 0)
    if refresh_for is not None:
      stored = _by_layer(state.cache)
      entries = layer_entries(stats)
      refresh_of = {
        p: refresh_for(slots[p], getattr(entries.get(p), "kind", None)) for p in averaged
      }
      whole_of = lambda v: {n: together(x) for n, x in v.items()}
      fresh_shapes = {
        p: jax.eval_shape(lambda v, g, p=p: refresh_of[p](whole_of(v), g), v, gamma)
        for p, v in averaged.items()
      }

      def in_stored_form(p):
        """The refresh of layer ``p``, in the form of its stored cache."""
        return lambda v, g: {
          n: apart(c) if isinstance(stored[p][n], WithBiasRow) else c
          for n, c in refresh_of[p](whole_of(v), g).items()
        }

      def refreshed():
        # Each layer's cache on one device of the mesh (once_per_mesh), where its
        # factors are split.
        new = dict(stored)
        fresh = once_per_mesh(
          [in_stored_form(p) for p in averaged], list(averaged.values()), (gamma,)
        )
        for p, cache in zip(averaged, fresh):
          new[p] = {n: put(stored[p][n], c) for n, c in cache.items()}
        return by_name(new) or state.cache

      def with_whole(cache):
        # The rule needs each layer's cache whole: on a mesh, where the state
        # splits it, all of it comes in through one all-gather, taken where
        # its split is the state's.
        leaves, treedef = jax.tree.flatten(cache)
        return cache, jax.tree.unflatten(treedef, whole(leaves))

      due = count % refresh_every == 0
      cache, whole_cache = jax.lax.cond(
        due,
        lambda: with_whole(refreshed()),
        lambda: with_whole(state.cache),
      )
      fields["cache"] = cache
      if shift_after_refresh is not None:

        def shifted(averages):
          # On refresh steps only: each layer's stored averages plus its shift on
          # the diagonal.
          current = _by_layer(averages)
          for p, v in averaged.items():
            for n, shift in shift_after_refresh(whole_of(v), gamma).items():
              matrix = together(fit(current[p][n], stored_shape(v[n]), who))
              shift = shift.astype(matrix.dtype)
              current[p][n] = put(current[p][n], add_to_diagonal(matrix, shift))
          return by_name(current)

        stored_averages = {n: fields[n] for n in statistics}
        fields.update(jax.lax.cond(due, shifted, lambda a: a, stored_averages))
      cached = _by_layer(whole_cache)
      averaged = {
        p: {
          **averaged[p],
          **{n: fit(together(cached[p][n]), c.shape, who) for n, c in fresh_shapes[p].items()},
        }
        for p in averaged
      }
    if scaling == kl.KL_CLIP:
      scale = kl_scale(
        scaling, value_at(learning_rate, count, dtype), value_at(kl_clip, count, dtype)
      )
    else:
      scale = kl_scale(scaling, None, None)
    updates = apply_layerwise(updates, slots, averaged, lambda g, s: group_rule(g, s, gamma), scale)
    return updates, state_cls(**fields)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def factors_due(opt_state: Any) -> jax.Array:
  """Whether this step's update will average the factors A / G: the capture's gate.

  Finds the K-FAC and FOOF states inside ``opt_state`` by their
  :class:`FactorGate` (also inside ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps`` …) and returns whether their next update averages the
  factors (``count % stats_every == 0``; any of them, if several), a scalar bool to
  pass as ``grad_fn(params, batch, factors_due=...)`` so that the capture
  computes A and G only on the steps that use them.

  Raises:
    ValueError: when ``opt_state`` holds no state with factor statistics.
  """
  gates = [
    g
    for g in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, FactorGate))
    if isinstance(g, FactorGate)
  ]
  if not gates:
    raise ValueError(
      "factors_due: opt_state holds no optimizer that averages factors"
      " (scale_by_kfac / scale_by_foof, or their aliases)"
    )
  out = gates[0].due
  for gate in gates[1:]:
    out = out | gate.due
  return out


__all__ = [
  "FactorGate",
  "factors_due",
  "LayerGradient",
  "Preconditioned",
  "apply_layerwise",
  "find_layer_slots",
  "fit",
  "has_room",
  "layout_statistics",
  "put",
  "room",
  "check_layerwise_hyperparameters",
  "kl_scale",
  "layerwise_transformation",
  "require_stats",
  "scale_preconditioned",
  "update_averages",
  "zero_statistics",
]
