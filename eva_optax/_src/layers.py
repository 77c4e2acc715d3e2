"""The layers of a parameter tree, and their kernels seen as matrices.

One place decides how the parameters of a Dense, DenseGeneral or Conv layer are
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


def infer_layout(
    kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None
) -> KernelLayout | None:
  """The layout of a kernel judged from its shape and its bias's shape.

  Without a bias: no stack and one output axis (Dense, Conv). With a bias
  (``stack + outputs``), the one split that matches both shapes; the smallest
  stack when several match. ``None`` for parameters of rank < 2. The capture
  records the true layout of every layer, and the optimizers check it against
  this guess, so a wrong guess is an error, never a silent approximation.
  """
  if len(kernel_shape) < 2:
    return None
  if bias_shape is None or len(bias_shape) == 0:
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
    layout = given.get(module) or infer_layout(kernel_shape, bias_shape)
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
  """The kernel as ``stack + (in, out)``."""
  stack, in_dim, out_dim = layout.dims(tuple(kernel.shape))
  return kernel.reshape(stack + (in_dim, out_dim))


def bias_vector(bias: jax.Array, layout: KernelLayout) -> jax.Array:
  """The bias as ``stack + (out,)``."""
  stack = tuple(bias.shape[: layout.stack_ndim])
  return bias.reshape(stack + (-1,))
