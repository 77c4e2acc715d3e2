"""The skeleton shared by layer-wise preconditioners: match, precondition, scale.

A layer-wise rule (:class:`~eva_optax._src.layerwise_rule.LayerwiseRule`: Eva,
Eva-f, K-FAC, FOOF) says which statistics it needs, how it preconditions the
layers of a step and what it caches; :func:`layerwise_transformation` composes
it with what they share. Per step:

1. find the layers in the update tree (:func:`~eva_optax._src.layers.find_layer_slots`);
2. update the running averages of the captured statistics
   (:func:`~eva_optax._src.layer_averages.update_averages`);
3. refresh the rule's cache when due, each layer's once across a mesh
   (:func:`~eva_optax._src.once_per_mesh.once_per_mesh`);
4. precondition the layers, all at once (:func:`apply_layerwise`), and scale
   them by one KL factor (:mod:`eva_optax._src.kl`);
5. pass every other parameter through unchanged.

The state keeps one tree per statistic (and per cache field), keyed by module
path, as optax states keep one tree per quantity. An update reads each tree
flat once, ``{statistic: {path: entry}}``, and writes it back once.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import kl
from eva_optax._src.hyper import check_period, check_range, value_at
from eva_optax._src.layer_averages import ByStatistic, update_averages
from eva_optax._src.layers import (
  LayerSlot,
  bias_from_vector,
  bias_vector,
  find_layer_slots,
  kernel_from_matrix,
  kernel_matrix,
)
from eva_optax._src.layerwise_rule import (
  LayerCurvature,
  LayerGradient,
  LayerwiseRule,
)
from eva_optax._src.layerwise_specs import LAYERWISE_STATES, layerwise_state_specs
from eva_optax._src.linalg import add_to_diagonal
from eva_optax._src.missing_stats import missing_stats_message
from eva_optax._src.once_per_mesh import once_per_mesh
from eva_optax._src.paths import BIAS, KERNEL, Path, flatten_with_paths, nest, path_of
from eva_optax._src.sharded_sums import whole
from eva_optax._src.sharding import is_placeholder, not_params_shaped, place
from eva_optax._src.state_entries import (
  entry_shapes,
  flatten_entries,
  layout_statistics,
  read_entry,
  write_entry,
  zero_averages,
  zero_entry,
)
from eva_optax._src.statistics import (
  FACTORS,
  STATISTICS,
  LayerStats,
  WithBiasRow,
  apart,
  layer_entries,
  stored_shape,
  together,
)


class LayerwiseOptions(NamedTuple):
  """The hyperparameters every layer-wise preconditioner shares.

  Attributes:
    learning_rate: η, for the KL clip (``None`` with ``'kl_normalise'``).
    damping: γ > 0, float or schedule.
    kl_clip: κ > 0, float or schedule (the KL clip only).
    stat_decay: weight of the old running averages, in [0, 1).
    scaling: ``'kl_clip'`` or ``'kl_normalise'`` (:mod:`eva_optax._src.kl`).
    layouts: the kernels' layouts (see :func:`eva_optax.scale_by_eva`), or
      ``None`` for the captured ones.
    stats_every: steps between updates of the running averages (0, N, 2N, …).
  """

  learning_rate: optax.ScalarOrSchedule | None
  damping: optax.ScalarOrSchedule
  kl_clip: optax.ScalarOrSchedule
  stat_decay: float | jax.Array
  scaling: str
  layouts: Any = None
  stats_every: int | jax.Array = 1


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


def require_stats(stats: Any, name: str) -> None:
  if stats is None:
    # The message names the Linen and NNX routes and the wrapper that dropped
    # the stats, if any (read from the call stack, on this error path only).
    raise ValueError(missing_stats_message(name))


def apply_layerwise(
  updates: Any,
  slots: dict[Path, LayerSlot],
  layers: dict[Path, Any],
  precondition: Callable[[Any, Any], Any],
  scale: Callable[[jax.Array], jax.Array],
) -> Any:
  """Preconditions the layers named in ``layers``, scales them, passes the rest.

  Args:
    updates: the gradient tree.
    slots: every layer of the tree (:func:`find_layer_slots`).
    layers: per layer to precondition, what ``precondition`` needs of it (a
      :class:`~eva_optax._src.layerwise_rule.LayerCurvature`).
    precondition: ``(gradients, layers' values) -> Preconditioned`` for all
      those layers at once (lists in the order of ``layers``; see
      :func:`~eva_optax._src.layerwise_rule.each_layer` for a rule written
      for one layer).
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


def _check(rule: LayerwiseRule, options: LayerwiseOptions) -> None:
  """The argument checks every layer-wise preconditioner shares."""
  kl.check_scaling(options.scaling)
  if options.scaling == kl.KL_CLIP and options.learning_rate is None:
    raise ValueError(f"{rule.name} with scaling='kl_clip' needs learning_rate")
  check_range("learning_rate", options.learning_rate, low=0.0, low_inclusive=True)
  check_range("damping", options.damping, low=0.0)
  check_range("kl_clip", options.kl_clip, low=0.0)
  check_range(
    "stat_decay", options.stat_decay, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False
  )
  check_period("stats_every", options.stats_every)
  if rule.refresh is not None:
    check_period("refresh_every", rule.refresh.every)
  fields = _state_fields(rule)
  if tuple(rule.state._fields) != fields:
    raise TypeError(f"{rule.name}: its state class needs the fields {fields}")


def _state_fields(rule: LayerwiseRule) -> tuple[str, ...]:
  """``count``, one field per statistic, ``cache`` with a refresh, ``gate`` with factors."""
  cache = ("cache",) if rule.refresh is not None else ()
  gate = ("gate",) if any(n in FACTORS for n in rule.statistics) else ()
  return ("count", *rule.statistics, *cache, *gate)


def _averages_of(values: Mapping[str, Any], slot: LayerSlot, kind: str = "Dense") -> LayerStats:
  """A layer's running averages (whole matrices) as a rule sees them."""
  whole_values = {n: together(v) for n, v in values.items()}
  return LayerStats(
    **{**dict.fromkeys(STATISTICS), **whole_values},
    kind=kind,
    layout=slot.layout,
    has_bias=slot.has_bias,
  )


def _cache_shapes(rule: LayerwiseRule, slot: LayerSlot) -> Any:
  """The shapes of a layer's cache (the rule's NamedTuple of ``ShapeDtypeStruct``)."""
  zeros = {
    n: jax.ShapeDtypeStruct(s, slot.dtype)
    for n, s in layout_statistics(slot, slot.layout, rule.statistics).items()
  }
  gamma = jnp.asarray(1.0, slot.dtype)
  return jax.eval_shape(
    lambda v: rule.refresh.compute(_averages_of(v, slot), gamma, slot),
    zeros,
  )


def _zero_cache(rule: LayerwiseRule, slots: Mapping[Path, LayerSlot]) -> Any:
  """The rule's cache class, each field a tree of zero entries keyed by module
  path, in the shapes :func:`entry_shapes` fixes (``None`` without layers)."""
  fields: dict[str, dict[Path, Any]] = {}
  cache_class = None
  for path, slot in slots.items():
    own = _cache_shapes(rule, slot)
    cache_class = type(own)
    shapes = entry_shapes(
      slot,
      rule.statistics,
      lambda layout, slot=slot: {
        n: v.shape for n, v in _cache_shapes(rule, slot._replace(layout=layout))._asdict().items()
      },
    )
    for n, v in own._asdict().items():
      fields.setdefault(n, {})[path] = zero_entry(slot, shapes[n], v.dtype)
  if cache_class is None:
    return None
  return cache_class(**{n: nest(entries) for n, entries in fields.items()})


def _state(rule: LayerwiseRule, count, averages: Mapping[str, Any], cache, gate) -> Any:
  """``rule.state`` of these values, each in its field (:func:`_state_fields`)."""
  values = {"count": count, **averages, "cache": cache, "gate": gate}
  return rule.state(*[values[f] for f in _state_fields(rule)])


def _every_step(every: int | jax.Array) -> bool:
  return not isinstance(every, jax.core.Tracer) and int(every) == 1


def _with_whole(entries: ByStatistic) -> tuple[ByStatistic, ByStatistic]:
  """The entries, and the same whole: on a mesh, where the state splits them,
  all of them come in through one all-gather (:func:`~eva_optax._src.sharded_sums.whole`)."""
  leaves, treedef = jax.tree.flatten(entries)
  return entries, jax.tree.unflatten(treedef, whole(leaves))


def _refresh(
  rule: LayerwiseRule,
  slots: Mapping[Path, LayerSlot],
  averages: Mapping[Path, LayerStats],
  values: ByStatistic,
  stored: ByStatistic,
  cached: ByStatistic,
  gamma: jax.Array,
  due: jax.Array,
) -> tuple[ByStatistic, ByStatistic, dict[Path, Any]]:
  """The cache, refreshed when ``due`` (``lax.cond``), and the averages, shifted
  on the diagonal then if the rule says so.

  Returns:
    The new cache entries and the new stored averages, ``{name: {path:
    entry}}``, and each preconditioned layer's cache, whole, as the rule's
    NamedTuple.
  """
  layers = list(averages)
  compute = rule.refresh.compute

  def in_stored_form(path: Path) -> Callable[..., Any]:
    """The refresh of layer ``path``, in the form of its stored cache."""

    def fn(v, gamma):
      cache = compute(_averages_of(v, slots[path], averages[path].kind), gamma, slots[path])
      return type(cache)(
        *[
          apart(c) if isinstance(cached[n][path], WithBiasRow) else c
          for n, c in zip(cache._fields, cache)
        ]
      )

    return fn

  def refreshed() -> ByStatistic:
    # Each layer's cache on one device of the mesh, where its averages are split.
    operands = [{n: values[n][p] for n in rule.statistics} for p in layers]
    fresh = once_per_mesh([in_stored_form(p) for p in layers], operands, (gamma,))
    new = {n: dict(entries) for n, entries in cached.items()}
    for path, cache in zip(layers, fresh):
      for n, c in zip(cache._fields, cache):
        new[n][path] = write_entry(cached[n][path], c)
    return new

  cached, whole_cached = jax.lax.cond(
    due, lambda: _with_whole(refreshed()), lambda: _with_whole(cached)
  )
  if rule.refresh.shift is not None:

    def shifted(stored: ByStatistic) -> ByStatistic:
      new = {n: dict(entries) for n, entries in stored.items()}
      for path in layers:
        shifts = rule.refresh.shift(averages[path], gamma)
        for n, shift in zip(rule.statistics, shifts):
          if shift is None:
            continue
          matrix = together(read_entry(new[n][path], stored_shape(values[n][path]), rule.name))
          new[n][path] = write_entry(
            new[n][path], add_to_diagonal(matrix, shift.astype(matrix.dtype))
          )
      return new

    stored = jax.lax.cond(due, shifted, lambda s: s, stored)
  per_layer = {}
  for path in layers:
    shapes = jax.eval_shape(lambda a, path=path: compute(a, gamma, slots[path]), averages[path])
    per_layer[path] = type(shapes)(
      *[
        read_entry(together(whole_cached[n][path]), s.shape, rule.name)
        for n, s in zip(shapes._fields, shapes)
      ]
    )
  return cached, stored, per_layer


def layerwise_transformation(
  rule: LayerwiseRule, options: LayerwiseOptions
) -> optax.GradientTransformationExtraArgs:
  """A layer-wise preconditioner: ``rule`` composed with what every rule shares.

  Per step: the running averages of ``rule.statistics`` (updated every
  ``options.stats_every`` steps), the rule's cache refreshed every
  ``rule.refresh.every`` steps (through ``lax.cond``, so that one compiled step
  serves every step), ``rule.precondition`` of all the captured layers at once,
  then the KL clip or normalisation over all of them. Parameters outside a
  layer are returned unchanged.

  The state is ``rule.state(count, *averages, [cache], [gate])``: a tree per
  statistic keyed by module path, the cache (the rule's NamedTuple, a tree per
  field) with a refresh, a :class:`FactorGate` when a statistic is a factor.
  """
  _check(rule, options)
  statistics = rule.statistics
  gated = any(n in FACTORS for n in statistics)
  LAYERWISE_STATES.add(rule.state)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    gate = FactorGate(jnp.ones([], jnp.bool_))  # count 0 averages
    if is_placeholder(params):
      # optax.tree_map_params: the per-layer trees are keyed by module path,
      # not shaped like the parameters.
      averages = {n: not_params_shaped() for n in statistics}
      return _state(rule, count, averages, not_params_shaped(), gate)
    slots = find_layer_slots(params, options.layouts)
    cache = _zero_cache(rule, slots) if rule.refresh is not None else None
    state = _state(rule, count, zero_averages(slots, statistics), cache, gate)
    return place(params, state, layerwise_state_specs(state, params))

  def update_fn(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    require_stats(stats, rule.name)
    count = state.count
    # Each layer's layout: as given, else as captured (the state made room).
    slots = find_layer_slots(updates, options.layouts, captured=stats)
    dtype = jnp.result_type(jnp.float32, *[s.dtype for s in slots.values()])
    gamma = value_at(options.damping, count, dtype)
    update_paths = {
      p for p, _ in flatten_with_paths(updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    }
    every = options.stats_every
    values, stored = update_averages(
      slots,
      stats,
      {n: flatten_entries(getattr(state, n)) for n in statistics},
      options.stat_decay,
      count,
      rule.name,
      update_paths,
      due=None if _every_step(every) else count % every == 0,
    )
    entries = layer_entries(stats)
    layers = list(values[statistics[0]])
    averages = {
      p: _averages_of({n: values[n][p] for n in statistics}, slots[p], entries[p].kind)
      for p in layers
    }
    caches = dict.fromkeys(layers)
    cache = None
    if rule.refresh is not None and state.cache is not None:
      cached = {n: flatten_entries(tree) for n, tree in state.cache._asdict().items()}
      due = count % rule.refresh.every == 0
      cached, stored, caches = _refresh(rule, slots, averages, values, stored, cached, gamma, due)
      cache = type(state.cache)(**{n: nest(entries) for n, entries in cached.items()})
    if options.scaling == kl.KL_CLIP:
      lr = value_at(options.learning_rate, count, dtype)
      clip = value_at(options.kl_clip, count, dtype)
    else:
      lr = clip = None
    updates = apply_layerwise(
      updates,
      slots,
      {p: LayerCurvature(averages[p], caches[p]) for p in layers},
      lambda grads, curvatures: rule.precondition(grads, curvatures, gamma),
      lambda total: kl.scale_factor(options.scaling, total, lr, clip),
    )
    next_count = optax.safe_increment(count)
    new_state = _state(
      rule,
      next_count,
      {n: nest(stored[n]) for n in statistics},
      cache,
      FactorGate(next_count % every == 0) if gated else None,
    )
    return updates, new_state

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
  "LayerwiseOptions",
  "apply_layerwise",
  "factors_due",
  "layerwise_transformation",
  "require_stats",
]
