"""A layer's entries in an optimizer state: their shapes, fixed at ``init``, and reading them.

``init`` sees the parameters only. Where they fix a layer's layout, each entry
(a running average, a cached inverse) has its exact shape. Where they allow
several layouts (a bias-free DenseGeneral or Einsum kernel, a stacked layer, a
depthwise convolution), the entry is a flat buffer long enough for each of them
(:func:`~eva_optax._src.layers.reserved_layouts`), and an update reads and
writes its head (:func:`read_entry`, :func:`write_entry`) once the capture says
the layout. A square matrix over â = [a, 1] is kept as a
:class:`~eva_optax._src.statistics.WithBiasRow`, so that its rows split evenly
over a mesh.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from eva_optax._src.layers import LayerSlot, reserved_layouts
from eva_optax._src.paths import Path, flatten_with_paths, nest
from eva_optax._src.statistics import (
  KernelLayout,
  WithBiasRow,
  apart,
  is_with_bias_row,
  keeps_bias_row_apart,
  statistic_shapes,
  stored_shape,
)


def layout_statistics(
  slot: LayerSlot, layout: KernelLayout, statistics: Sequence[str]
) -> dict[str, tuple[int, ...]]:
  """The shapes of ``statistics`` for the layer of ``slot`` read with ``layout``."""
  shapes = statistic_shapes(*layout.dims(slot.kernel_shape), slot.has_bias)
  return {name: shapes[name] for name in statistics}


def entry_shapes(
  slot: LayerSlot,
  statistics: Sequence[str],
  shapes: Callable[[KernelLayout], dict[str, tuple[int, ...]]] | None = None,
) -> dict[str, tuple[int, ...]]:
  """The shape of each of a layer's state entries, fixed at ``init``.

  ``shapes(layout)``: the optimizer's entries for a layer of that layout
  (default: its ``statistics``). When every reading the state makes room for
  (:func:`~eva_optax._src.layers.reserved_layouts`, judged by the size of
  ``statistics``) gives an entry the same shape, that shape; otherwise a flat
  buffer as long as its largest reading.
  """
  shapes = shapes or (lambda layout: layout_statistics(slot, layout, statistics))
  size = lambda layout: sum(
    math.prod(s) for s in layout_statistics(slot, layout, statistics).values()
  )
  layouts = reserved_layouts(slot.kernel_shape, slot.possible_layouts, size) or (slot.layout,)
  options = [shapes(layout) for layout in layouts]
  return {
    n: shape if all(o[n] == shape for o in options) else (max(math.prod(o[n]) for o in options),)
    for n, shape in options[0].items()
  }


def holds_layout(slot: LayerSlot, layout: KernelLayout, statistics: Sequence[str]) -> bool:
  """Whether the entries :func:`entry_shapes` sets aside for ``slot`` hold ``layout``'s."""
  held = entry_shapes(slot, statistics)
  wanted = layout_statistics(slot, layout, statistics)
  return all(
    held[n] == shape or (len(held[n]) == 1 and held[n][0] >= math.prod(shape))
    for n, shape in wanted.items()
  )


def zero_entry(slot: LayerSlot, shape: tuple[int, ...], dtype: Any) -> Any:
  """A zero state entry of ``shape`` for the layer of ``slot``: an array, or a
  :class:`~eva_optax._src.statistics.WithBiasRow` for a square matrix over â."""
  stack, in_dim, _ = slot.layout.dims(slot.kernel_shape)
  zeros = jnp.zeros(shape, dtype)
  return apart(zeros) if keeps_bias_row_apart(stack, in_dim, slot.has_bias, shape) else zeros


def zero_averages(slots: dict[Path, LayerSlot], statistics: Sequence[str]) -> dict[str, Any]:
  """Zero running averages of ``statistics`` for every layer, in the shapes of
  :func:`entry_shapes`: ``{name: tree keyed by module path}``."""
  flat = {p: entry_shapes(s, statistics) for p, s in slots.items()}
  return {
    n: nest({p: zero_entry(slots[p], shapes[n], slots[p].dtype) for p, shapes in flat.items()})
    for n in statistics
  }


def flatten_entries(tree: Any) -> dict[Path, Any]:
  """``{module path: entry}`` of a per-layer state tree (an entry: an array or a
  :class:`~eva_optax._src.statistics.WithBiasRow`)."""
  return dict(flatten_with_paths(tree, is_leaf=is_with_bias_row))


def read_entry(stored: Any, shape: tuple[int, ...], where: str) -> Any:
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


def write_entry(stored: Any, value: Any) -> Any:
  """``value`` as the new state entry ``stored`` (which :func:`read_entry` read it
  from): itself, in the stored form, or at the head of a flat buffer whose tail
  is zero."""
  if isinstance(stored, WithBiasRow):
    value = value if isinstance(value, WithBiasRow) else apart(value)
    return jax.tree.map(lambda v, s: v.astype(s.dtype), value, stored)
  if tuple(stored.shape) == tuple(value.shape):
    return value.astype(stored.dtype)
  flat = value.reshape(-1).astype(stored.dtype)
  return jnp.pad(flat, (0, stored.shape[0] - flat.shape[0]))
