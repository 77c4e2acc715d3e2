"""The layers of a parameter tree, and their kernels seen as matrices.

One place decides how the parameters of a Dense, DenseGeneral, Conv or Einsum layer are
seen as the matrix the preconditioners work on, for every optimizer of the
library: a kernel of layout ``stack + inputs + outputs``
(:class:`~eva_optax.KernelLayout`) is the matrix ``stack + (in, out)``, a free
reshape; a bias has the axes ``stack + outputs`` and becomes the extra row of
that matrix, matched by a trailing 1 appended to the mean input ā.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from eva_optax._src.paths import BIAS, KERNEL, Path, flatten_with_paths, path_str
from eva_optax._src.statistics import (
  KernelLayout,
  LayerStats,
  PassThrough,
  statistic_dtype,
  statistic_shapes,
)


class NameReading(NamedTuple):
  """What a module's name says of its bias-free kernel's layout, beyond its shape.

  Attributes:
    guess: the layout to take first, in place of the shape's guess (``None``: the
      shape's).
    more: further readings, after the shape's.
    closed: the name rules out the shape's other readings of a rank-3 kernel (the
      DenseGeneral splits and Einsums of :func:`possible_layouts`).
  """

  guess: KernelLayout | None = None
  more: tuple[KernelLayout, ...] = ()
  closed: bool = False


#: ``(kernel_shape, module_name) -> NameReading | None``: a framework's naming
#: conventions, for the kernels whose shape alone does not fix their layout.
NamingConvention = Callable[[tuple[int, ...], str], "NameReading | None"]

_naming_convention: NamingConvention | None = None


def set_naming_convention(convention: NamingConvention | None) -> NamingConvention | None:
  """The one hook through which a front-end's module names reach ``init``; returns the
  previous convention.

  ``tx.init(params)`` sees only the parameters. Their shapes fix most layouts; where they
  do not, the framework's names for its modules say more (Flax's attention projections,
  its Einsum modules). This module knows no framework: the Flax front-ends set Flax's
  conventions here when ``eva_optax`` is imported (``eva_optax._src.flax_layouts``).
  ``None`` reads every kernel by its shape alone.
  """
  global _naming_convention
  previous, _naming_convention = _naming_convention, convention
  return previous


def _named(
  kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None, name: str | None
) -> NameReading | None:
  """The naming convention's reading of a bias-free kernel, or ``None``."""
  if bias_shape or not name or _naming_convention is None:
    return None
  return _naming_convention(tuple(kernel_shape), name)


def infer_layout(
  kernel_shape: tuple[int, ...],
  bias_shape: tuple[int, ...] | None,
  name: str | None = None,
) -> KernelLayout | None:
  """The layout of a kernel judged from its shape, its bias's shape and its name.

  Without a bias: no stack and one output axis (Dense, Conv), unless the naming
  convention (:func:`set_naming_convention`) reads the module's name otherwise
  (Flax's attention projections ``query``/``key``/``value``: two output axes). With
  a bias (``stack + outputs``), the one split that matches both shapes; the smallest
  stack when several match. ``None`` for parameters of rank < 2. The capture
  records the true layout of every layer, and the optimizers check it against
  this guess, so a wrong guess is an error, never a silent approximation.
  """
  if len(kernel_shape) < 2:
    return None
  if bias_shape is None or len(bias_shape) == 0:
    named = _named(kernel_shape, bias_shape, name)
    if named is not None and named.guess is not None:
      return named.guess
    return KernelLayout(0, 1)
  for stack_ndim in range(len(bias_shape)):
    output_ndim = len(bias_shape) - stack_ndim
    if len(kernel_shape) - stack_ndim - output_ndim < 1:
      continue
    if tuple(kernel_shape[:stack_ndim]) == tuple(bias_shape[:stack_ndim]) and tuple(
      kernel_shape[len(kernel_shape) - output_ndim :]
    ) == tuple(bias_shape[stack_ndim:]):
      return KernelLayout(stack_ndim, output_ndim)
  return KernelLayout(0, 1)


def possible_layouts(
  kernel_shape: tuple[int, ...],
  bias_shape: tuple[int, ...] | None,
  name: str | None = None,
) -> tuple[KernelLayout, ...]:
  """The layouts a layer with this kernel and bias can have; the guess first.

  The parameters fix the layout of a kernel of rank 2, and without a bias of
  rank ≥ 4 (a Conv: window and input channels, then output channels), up to
  the group count of a convolution with one input channel per group
  (depthwise: every divisor of the output channels). A bias-free kernel of
  rank 3 can also be a DenseGeneral with two output axes, a stack of Dense
  layers (``nn.scan``, ``nnx.vmap``) or an Einsum that contracts its axis 1
  or 2 ('BTD,NDH->BTNH'); with a bias, any rank ≥ 3, only the readings
  whose stack and output axes hold as many entries as the bias. The naming
  convention (:func:`set_naming_convention`) may replace the guess of a
  bias-free kernel, rule out the rank-3 family or add readings (Flax's:
  ``eva_optax._src.flax_layouts``).

  Optimizers reserve room in their state for these readings
  (:func:`reserved_layouts`), so that the capture's layout is taken at the
  first update without a ``layouts=`` step.
  """
  guess = infer_layout(kernel_shape, bias_shape, name)
  if guess is None:
    return ()
  named = _named(kernel_shape, bias_shape, name)
  rank = len(kernel_shape)
  out: list[KernelLayout] = [guess]
  if rank >= 3 and kernel_shape[-2] == 1 and guess.stack_ndim == 0 and guess.output_ndim == 1:
    out += [
      KernelLayout(1, 1, groups=g)
      for g in range(2, kernel_shape[-1] + 1)
      if kernel_shape[-1] % g == 0
    ]
  if bias_shape:
    family = _stacked_and_einsum_layouts(kernel_shape) if rank >= 3 else []
    spans = lambda l: math.prod(l.dims(kernel_shape)[0]) * l.dims(kernel_shape)[2]
    out += [l for l in family if spans(l) == math.prod(bias_shape)]
  elif rank == 3 and not (named is not None and named.closed):
    out += _stacked_and_einsum_layouts(kernel_shape)
  if named is not None:
    out += named.more
  unique: list[KernelLayout] = []
  for layout in out:
    if layout not in unique:
      unique.append(layout)
  return tuple(unique)


def _stacked_and_einsum_layouts(kernel_shape: tuple[int, ...]) -> list[KernelLayout]:
  """DenseGeneral splits (outputs at the end, at most one stack axis) and, for
  rank 3, the Einsums contracting axis 1 or 2."""
  rank = len(kernel_shape)
  family = [KernelLayout(stack, outputs) for stack in (0, 1) for outputs in range(1, rank - stack)]
  if rank == 3:
    family += [
      KernelLayout(0, 2, permutation=(i,) + tuple(a for a in range(3) if a != i))
      for i in range(1, 3)
    ]
  return family


def reserved_layouts(
  kernel_shape: tuple[int, ...],
  layouts: tuple[KernelLayout, ...],
  size: Any,
  factor: float = 8.0,
) -> tuple[KernelLayout, ...]:
  """The readings an optimizer's state makes room for: the guess (first) and
  every other whose state takes at most ``factor`` times the guess's
  (``size(layout)``: the entries the optimizer keeps for a layer of that
  layout), and the group counts of a depthwise convolution, whatever their size.
  """
  if not layouts:
    return ()
  limit = factor * size(layouts[0])
  return tuple(l for i, l in enumerate(layouts) if i == 0 or l.groups > 1 or size(l) <= limit)


class LayerSlot(NamedTuple):
  """A layer of the parameter tree: its module path, kernel and bias leaves.

  ``possible_layouts``: the layouts its parameters allow (:func:`possible_layouts`, the guess
  first), or ``()`` when ``layout`` was given (by ``layouts=``) or captured.
  """

  path: Path
  layout: KernelLayout
  kernel_shape: tuple[int, ...]
  has_bias: bool
  dtype: Any = jnp.float32  # of its statistics and of the preconditioning
  possible_layouts: tuple[KernelLayout, ...] = ()


def _layouts_by_path(layouts: Any) -> dict[Path, KernelLayout]:
  given: dict[Path, KernelLayout] = {}
  if layouts is None:
    return given
  for path, entry in flatten_with_paths(
    layouts, is_leaf=lambda x: isinstance(x, (KernelLayout, LayerStats, PassThrough))
  ):
    if isinstance(entry, LayerStats):
      given[path] = entry.layout
    elif isinstance(entry, KernelLayout):
      given[path] = entry
  return given


def find_layer_slots(
  params: Any, layouts: Any = None, captured: Any = None
) -> dict[Path, LayerSlot]:
  """Every module of ``params`` that owns a ``kernel`` of rank ≥ 2.

  Each layer's layout is, in this order: the one ``layouts`` gives (``None``,
  a callable ``params -> layouts``, or a nested dict or stats tree giving a
  :class:`KernelLayout` or :class:`LayerStats` per module path); the one the
  ``captured`` statistics record; else guessed from the parameters
  (:func:`infer_layout`, with the other :func:`possible_layouts` kept on the slot).
  """
  if callable(layouts):
    layouts = layouts(params)
  given = _layouts_by_path(layouts)
  recorded = _layouts_by_path(captured)
  leaves = dict(flatten_with_paths(params))
  slots: dict[Path, LayerSlot] = {}
  for path, leaf in leaves.items():
    if not path or path[-1] != KERNEL or jnp.ndim(leaf) < 2:
      continue
    module = path[:-1]
    bias = leaves.get(module + (BIAS,))
    bias_shape = None if bias is None else tuple(jnp.shape(bias))
    kernel_shape = tuple(jnp.shape(leaf))
    layout = given.get(module) or recorded.get(module)
    options: tuple[KernelLayout, ...] = ()
    if layout is None:
      options = possible_layouts(kernel_shape, bias_shape, module[-1] if module else None)
      layout = options[0]
    layout.check(kernel_shape, f"layer {path_str(module)!r}")
    dtype = statistic_dtype(jnp.result_type(leaf))
    slots[module] = LayerSlot(module, layout, kernel_shape, bias is not None, dtype, options)
  return slots


def check_stats_match(slot: LayerSlot, entry: LayerStats) -> None:
  """Raises a clear error when captured statistics do not fit the layer slot."""
  where = f"layer {path_str(slot.path)!r}"
  if entry.layout != slot.layout:
    raise ValueError(
      f"{where}: the captured layout {entry.layout} differs from the layout"
      f" {slot.layout} given to the optimizer (layouts=): give it"
      " layouts=eva_optax.layouts_of(stats), or no layouts at all"
    )
  wanted = statistic_shapes(*slot.layout.dims(slot.kernel_shape), slot.has_bias)
  for name, shape in wanted.items():
    value = getattr(entry, name)
    if value is not None and tuple(value.shape) != shape:
      raise ValueError(
        f"{where}: {name} of shape {tuple(value.shape)} does not fit the kernel"
        f" {slot.kernel_shape} (expected {shape})"
      )
  if entry.has_bias != slot.has_bias:
    raise ValueError(
      f"{where}: the capture says has_bias={entry.has_bias} but the parameters"
      f" say has_bias={slot.has_bias}"
    )


def kernel_matrix(kernel: jax.Array, layout: KernelLayout) -> jax.Array:
  """The kernel as ``stack + (in, out)`` (axes permuted first when the layout says so)."""
  stack, in_dim, out_dim = layout.dims(tuple(kernel.shape))
  if layout.groups > 1:  # (…, out) → (…, groups, out/groups), groups to the stack
    kernel = kernel.reshape(kernel.shape[:-1] + (layout.groups, -1))
    kernel = jnp.moveaxis(kernel, -2, layout.stack_ndim - 1)
  elif layout.permutation is not None:
    kernel = jnp.transpose(kernel, layout.permutation)
  return kernel.reshape(stack + (in_dim, out_dim))


def kernel_from_matrix(
  matrix: jax.Array, layout: KernelLayout, kernel_shape: tuple[int, ...]
) -> jax.Array:
  """The inverse of :func:`kernel_matrix`: a ``stack + (in, out)`` matrix as a kernel."""
  if layout.groups > 1:
    ordered = matrix.reshape(layout.ordered(tuple(kernel_shape)))
    return jnp.moveaxis(ordered, layout.stack_ndim - 1, -2).reshape(kernel_shape)
  if layout.permutation is None:
    return matrix.reshape(kernel_shape)
  ordered = matrix.reshape(layout.ordered(tuple(kernel_shape)))
  inverse = tuple(layout.permutation.index(i) for i in range(len(layout.permutation)))
  return jnp.transpose(ordered, inverse)


def _bias_order(layout: KernelLayout, kernel_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The kernel axes of the bias in ``stack + outputs`` order, and in the
  order of the bias's entries."""
  perm = layout.permutation
  kept = perm[: layout.stack_ndim] + perm[kernel_ndim - layout.output_ndim :]
  return kept, layout.bias_axes if layout.bias_axes is not None else tuple(sorted(kept))


def bias_vector(
  bias: jax.Array, layout: KernelLayout, kernel_shape: tuple[int, ...] | None = None
) -> jax.Array:
  """The bias as ``stack + (out,)`` (``kernel_shape`` needed with a permutation)."""
  if layout.groups > 1:  # (…, out) → (…, groups, out/groups)
    return bias.reshape(bias.shape[:-1] + (layout.groups, -1))
  if layout.permutation is not None:
    kept, entries = _bias_order(layout, len(kernel_shape))
    bias = bias.reshape(tuple(kernel_shape[a] for a in entries))
    bias = jnp.transpose(bias, tuple(entries.index(a) for a in kept))
  stack = tuple(bias.shape[: layout.stack_ndim])
  return bias.reshape(stack + (-1,))


def bias_from_vector(
  vector: jax.Array,
  layout: KernelLayout,
  bias_shape: tuple[int, ...],
  kernel_shape: tuple[int, ...] | None = None,
) -> jax.Array:
  """The inverse of :func:`bias_vector`."""
  if layout.permutation is None:
    return vector.reshape(bias_shape)
  kept, entries = _bias_order(layout, len(kernel_shape))
  ordered = vector.reshape(tuple(kernel_shape[a] for a in kept))
  return jnp.transpose(ordered, tuple(kept.index(a) for a in entries)).reshape(bias_shape)
