"""The layer record a front-end gives the capture: its kind, its geometry (dense, convolution,
einsum) and its kernel layout."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from eva_optax._src.statistics import (
  KernelLayout,
  statistic_dtype,
)


class DenseGeometry(NamedTuple):
  """A dense layer y = x·W (+ b) contracting the input axes ``axis``.

  ``axis``: the contracted input axes, negative or not (Dense: ``(-1,)``);
  as in Flax, the kernel's input axes follow them in increasing order.
  """

  axis: tuple[int, ...] = (-1,)


class ConvGeometry(NamedTuple):
  """A convolution with a kernel of shape ``kernel_size + (in, out)`` (HWIO).

  Every field is one int per spatial axis, except ``padding``: ``'SAME'``,
  ``'VALID'``, ``'CAUSAL'``, ``'CIRCULAR'``, ``'REFLECT'``, or a
  ``(low, high)`` pair per spatial axis — Flax's conventions. With
  ``groups`` > 1 the input channels and the outputs split into that many
  contiguous groups, group g mapping its channels to its outputs (the kernel's
  ``in`` is then channels/groups).
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int = 1  # feature_group_count: each group of channels its own layer


class EinsumGeometry(NamedTuple):
  """y = einsum(``'{inputs},{kernel}->{output}'``, x, kernel) (+ bias).

  Each kernel label is a contracted input axis (in ``inputs``, not in
  ``output``), an output axis (in ``output`` only) or a stack axis (in all
  three: one independent layer per index). :func:`einsum_geometry` builds it
  from an equation, or says why an equation is not supported.
  """

  inputs: str
  kernel: str
  output: str

  @property
  def stack(self) -> str:
    return "".join(c for c in self.kernel if c in self.inputs and c in self.output)

  @property
  def contracted(self) -> str:
    return "".join(c for c in self.kernel if c in self.inputs and c not in self.output)

  @property
  def outputs(self) -> str:
    return "".join(c for c in self.kernel if c not in self.inputs)

  def permutation(self) -> tuple[int, ...]:
    """The kernel's axes as ``stack + contracted + outputs``."""
    return tuple(self.kernel.index(c) for c in self.stack + self.contracted + self.outputs)

  def bias_axes(self) -> tuple[int, ...]:
    """The kernel axes of a bias, in the output's order (how Flax adds it)."""
    return tuple(self.kernel.index(c) for c in self.output if c in self.kernel)


Geometry = DenseGeometry | ConvGeometry | EinsumGeometry


def einsum_geometry(equation: str) -> EinsumGeometry | str:
  """The :class:`EinsumGeometry` of ``'x,kernel->y'``, or why it is not a layer
  the statistics describe (the reason, a string)."""
  equation = equation.replace(" ", "")
  if "..." in equation:
    return f"Einsum {equation!r} has an ellipsis: its axes cannot be named before the call"
  if equation.count("->") != 1 or equation.split("->")[0].count(",") != 1:
    return f"Einsum {equation!r} is not of the form 'x,kernel->y'"
  operands, output = equation.split("->")
  inputs, kernel = operands.split(",")
  for name, labels in (("input", inputs), ("kernel", kernel), ("output", output)):
    if len(set(labels)) != len(labels):
      return f"Einsum {equation!r} repeats a label of the {name} (a diagonal)"
  geometry = EinsumGeometry(inputs, kernel, output)
  if any(c not in inputs and c not in output for c in kernel):
    return f"Einsum {equation!r} sums a kernel axis that neither input nor output has"
  if any(c not in kernel and c not in output for c in inputs):
    return f"Einsum {equation!r} sums an input axis the kernel does not contract"
  if not geometry.contracted or not geometry.outputs:
    return f"Einsum {equation!r} needs a contracted axis and an output axis in the kernel"
  return geometry


class Layer(NamedTuple):
  """One captured layer (static): what the front-end learned, what the core needs.

  Attributes:
    kind: the layer's name in the stats (``'Dense'``, ``'Linear'``, ``'Conv'`` …).
    geometry: how the layer maps its input (:class:`DenseGeometry`,
      :class:`ConvGeometry`, :class:`EinsumGeometry`).
    layout: the :class:`~eva_optax.KernelLayout` of its (possibly stacked) kernel.
    stack_shape: the leading stacked-layer axes of the kernel.
    in_dim: the contracted size (the product of the input axes).
    out_dim: the feature size (the product of the output axes).
    has_bias: whether the layer has a bias.
    dtype: the statistics' dtype (:func:`~eva_optax._src.statistics.statistic_dtype`).
    factor_rows: what a row of the factors A and G is:
      ``'positions'``, every position of every sample; ``'samples'``, one row
      per sample, the mean over its positions.
  """

  kind: str
  geometry: Geometry
  layout: KernelLayout
  stack_shape: tuple[int, ...]
  in_dim: int
  out_dim: int
  has_bias: bool
  dtype: str = "float32"
  factor_rows: str = "positions"


def layer_record(
  kind: str,
  geometry: Geometry,
  kernel_shape: tuple[int, ...],
  kernel_ndim: int,
  output_ndim: int,
  has_bias: bool,
  kernel_dtype: Any = jnp.float32,
) -> Layer:
  """The :class:`Layer` of a kernel of shape ``kernel_shape``, whose unstacked
  rank is ``kernel_ndim`` (the leading extra axes are a stack of layers); its
  statistics are kept in :func:`~eva_optax._src.statistics.statistic_dtype`
  of the kernel's dtype."""
  scan = len(kernel_shape) - kernel_ndim
  if isinstance(geometry, EinsumGeometry):
    # Stacked layers (scan) first, then the equation's own stack axes.
    perm = tuple(range(scan)) + tuple(scan + a for a in geometry.permutation())
    bias_axes = tuple(range(scan)) + tuple(scan + a for a in geometry.bias_axes())
    layout = KernelLayout(
      scan + len(geometry.stack),
      len(geometry.outputs),
      None if perm == tuple(range(len(perm))) else perm,
      None if perm == tuple(range(len(perm))) else bias_axes,
    )
  elif isinstance(geometry, ConvGeometry) and geometry.groups > 1:
    layout = KernelLayout(scan + 1, 1, groups=geometry.groups)
  else:
    layout = KernelLayout(scan, output_ndim)
  stack, in_dim, out_dim = layout.dims(tuple(kernel_shape))
  dtype = jnp.dtype(statistic_dtype(kernel_dtype)).name
  return Layer(kind, geometry, layout, stack, in_dim, out_dim, has_bias, dtype)


def canonical_padding(padding: Any, rank: int) -> str | tuple[tuple[int, int], ...]:
  """Flax's padding argument (a string, an int, ints or pairs per axis) as
  a string or a ``(low, high)`` pair per spatial axis."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != rank or any(len(p) != 2 for p in pads):
    raise ValueError(f"invalid convolution padding {padding!r} for {rank} spatial axes")
  return pads


def per_axis(value: Any, rank: int) -> tuple[int, ...]:
  """A stride or dilation (``None``, an int or one int per axis) as one int per axis."""
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)
