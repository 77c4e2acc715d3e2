"""The layers of a parameter tree, and their kernels seen as matrices.

One place decides how the parameters of a Dense, DenseGeneral, Conv or Einsum layer are
seen as the matrix the preconditioners work on, for every optimizer of the
library: a kernel of layout ``stack + inputs + outputs``
(:class:`~eva_optax.KernelLayout`) is the matrix ``stack + (in, out)``, a free
reshape; a bias has the axes ``stack + outputs`` and becomes the extra row of
that matrix, matched by a trailing 1 appended to the mean input ā.
"""

from __future__ import annotations

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


#: Flax's attention projections (``nn.MultiHeadDotProductAttention``,
#: ``nnx.MultiHeadAttention``): a kernel (features, heads, head_dim) with two
#: output axes; their output projection ``out`` contracts (heads, head_dim).
ATTENTION_INPUT_PROJECTIONS = ("query", "key", "value")


def infer_layout(
    kernel_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    name: str | None = None,
) -> KernelLayout | None:
  """The layout of a kernel judged from its shape, its bias's shape and its name.

  Without a bias: no stack and one output axis (Dense, Conv, the attention
  output projection), except a rank-3 kernel named ``query``, ``key`` or
  ``value`` (Flax's attention projections, ``(features, heads, head_dim)``):
  two output axes. With a bias
  (``stack + outputs``), the one split that matches both shapes; the smallest
  stack when several match. ``None`` for parameters of rank < 2. The capture
  records the true layout of every layer, and the optimizers check it against
  this guess, so a wrong guess is an error, never a silent approximation.
  """
  if len(kernel_shape) < 2:
    return None
  if bias_shape is None or len(bias_shape) == 0:
    if len(kernel_shape) == 3 and name in ATTENTION_INPUT_PROJECTIONS:
      return KernelLayout(0, 2)
    return KernelLayout(0, 1)
  for stack_ndim in range(len(bias_shape)):
    output_ndim = len(bias_shape) - stack_ndim
    if len(kernel_shape) - stack_ndim - output_ndim < 1:
      continue
    if (
        tuple(kernel_shape[:stack_ndim]) == tuple(bias_shape[:stack_ndim])
        and tuple(kernel_shape[len(kernel_shape) - output_ndim :])
        == tuple(bias_shape[stack_ndim:])
    ):
      return KernelLayout(stack_ndim, output_ndim)
  return KernelLayout(0, 1)


class LayerSlot(NamedTuple):
  """A layer of the parameter tree: its module path, kernel and bias leaves."""

  path: Path
  layout: KernelLayout
  kernel_shape: tuple[int, ...]
  has_bias: bool
  dtype: Any = jnp.float32  # of its statistics and of the preconditioning


def find_layer_slots(params: Any, layouts: Any = None) -> dict[Path, LayerSlot]:
  """Every module of ``params`` that owns a ``kernel`` of rank ≥ 2.

  ``layouts``: ``None`` (infer each layout, :func:`infer_layout`), a callable
  ``params -> layouts``, or a nested dict (or stats tree) giving a
  :class:`KernelLayout` (or :class:`LayerStats`) per module path; modules it
  does not name are inferred.
  """
  if callable(layouts):
    layouts = layouts(params)
  given: dict[Path, KernelLayout] = {}
  if layouts is not None:
    for path, entry in flatten_with_paths(
        layouts, is_leaf=lambda x: isinstance(x, (KernelLayout, LayerStats, PassThrough))
    ):
      if isinstance(entry, LayerStats):
        given[path] = entry.layout
      elif isinstance(entry, KernelLayout):
        given[path] = entry
  leaves = dict(flatten_with_paths(params))
  slots: dict[Path, LayerSlot] = {}
  for path, leaf in leaves.items():
    if not path or path[-1] != KERNEL or jnp.ndim(leaf) < 2:
      continue
    module = path[:-1]
    bias = leaves.get(module + (BIAS,))
    bias_shape = None if bias is None else tuple(jnp.shape(bias))
    kernel_shape = tuple(jnp.shape(leaf))
    layout = given.get(module) or infer_layout(
        kernel_shape, bias_shape, module[-1] if module else None
    )
    layout.check(kernel_shape, f"layer {path_str(module)!r}")
    dtype = statistic_dtype(jnp.result_type(leaf))
    slots[module] = LayerSlot(module, layout, kernel_shape, bias is not None, dtype)
  return slots


def check_stats_match(slot: LayerSlot, entry: LayerStats) -> None:
  """Raises a clear error when captured statistics do not fit the layer slot."""
  where = f"layer {path_str(slot.path)!r}"
  if entry.layout != slot.layout:
    raise ValueError(
        f"{where}: the captured layout {entry.layout} differs from the layout"
        f" {slot.layout} the optimizer state was initialised with (guessed from"
        " the parameter shapes). Pass layouts=eva_optax.layouts_of(stats) to the"
        " optimizer."
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
