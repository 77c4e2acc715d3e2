"""Where each leaf of a layer-wise state lives on a mesh, from the parameters' shardings.

Each statistic follows its kernel (:func:`eva_optax._src.sharding.statistic_spec`,
read with the layout its parameters suggest); a flat buffer sized for several
layouts (:func:`~eva_optax._src.state_entries.entry_shapes`), or a statistic
whose shape the suggested layout does not give, is replicated, as are the count
and the factor gate. :func:`eva_optax.state_shardings` uses these specs for any
state that holds a layer-wise one.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from eva_optax._src.layers import find_layer_slots
from eva_optax._src.paths import KERNEL, Path, flatten_with_paths, nest
from eva_optax._src.sharding import params_mesh, spec_of, statistic_spec
from eva_optax._src.state_entries import flatten_entries
from eva_optax._src.statistics import (
  INPUT_MEAN,
  OUTPUT_GRAD_MEAN,
  STATISTICS,
  WithBiasRow,
  statistic_shapes,
)

#: The state classes of every layer-wise transformation built
#: (:func:`eva_optax._src.preconditioning.layerwise_transformation` adds them).
LAYERWISE_STATES: set[type] = set()


def is_layerwise_state(x: Any) -> bool:
  """Whether ``x`` is the state of a layer-wise transformation."""
  return type(x) in LAYERWISE_STATES


def layerwise_state_specs(state: Any, params: Any, split_matrices: bool = True) -> Any:
  """The ``PartitionSpec`` of every leaf of a layer-wise state, from the parameters'.

  ``params``: arrays or ``jax.ShapeDtypeStruct`` leaves carrying their
  ``NamedSharding``. A per-layer matrix (a factor, an inverse) has its rows
  split too, unless ``split_matrices`` is false: then it is whole on every
  device of its kernel's stack axes.
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
    kernel = (kernel_specs[path], len(slot.kernel_shape), slot.layout, name)
    if isinstance(stored, WithBiasRow):  # the rows split, the bias row with the stack
      rows = statistic_spec(*kernel, matrix_mesh, stored.rows.shape[len(stack)])
      return WithBiasRow(rows, statistic_spec(*kernel))
    shapes = statistic_shapes(*slot.layout.dims(slot.kernel_shape), slot.has_bias)
    vector = name in (INPUT_MEAN, OUTPUT_GRAD_MEAN)
    rows = len(stack) if not vector else len(stored.shape) - 1
    spec = statistic_spec(
      *kernel,
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

  def by_path(name: str, tree: Any) -> Any:
    return nest({p: entry_spec(p, name, v) for p, v in flatten_entries(tree).items()})

  def field_specs(field: str, value: Any) -> Any:
    if field == "cache" and hasattr(value, "_fields"):  # the rule's cache: a tree per field
      return type(value)(*[by_path(n, getattr(value, n)) for n in value._fields])
    if field in STATISTICS:
      return by_path(field, value)
    return jax.tree.map(lambda _: replicated, value)

  return type(state)(*[field_specs(f, getattr(state, f)) for f in state._fields])
