"""What the captured statistics are: their names, shapes and containers.

The one place that says which statistics exist and what shape each has, shared
by the optimizer rules (which average them) and by the Linen and NNX captures
(which compute them); neither side imports the other.

Notation used across the library (Zhang, Shi, Li, ICLR 2023): a layer with
kernel matrix W of shape ``(in, out)`` and input a has

* ā (``input_mean``): the mean layer input, shape ``(in,)``;
* ḡ (``output_grad_mean``): the mean gradient of the loss w.r.t. the layer
  output, shape ``(out,)``;
* A (``input_factor``): K-FAC's E[â âᵀ], with â = [a, 1] when the layer has a
  bias, shape ``(in[+1], in[+1])``;
* G (``output_grad_factor``): K-FAC's E[g gᵀ] of the per-sample output
  gradients, shape ``(out, out)``;

each with the leading ``stack`` axes of layers stacked by ``nn.scan`` /
``nnx.vmap`` (one set of statistics per layer of the stack).

A kernel has the axes ``stack + inputs + outputs``:

* ``stack``: leading axes of stacked layers;
* ``inputs``: the contracted axes (Dense: ``in``; DenseGeneral: the ``axis``
  dimensions in order; Conv: the window and the input channels, HWIO order);
* ``outputs``: the feature axes (one, or several for DenseGeneral).

:class:`KernelLayout` records the number of stack and output axes; the matrix
view of a kernel is then ``stack + (in, out)`` with ``in`` and ``out`` the
products of the input and output axes, which is a free reshape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from eva_optax._src.paths import Path, flatten_with_paths, nest

INPUT_MEAN = "input_mean"
OUTPUT_GRAD_MEAN = "output_grad_mean"
INPUT_FACTOR = "input_factor"
OUTPUT_GRAD_FACTOR = "output_grad_factor"
STATISTICS = (INPUT_MEAN, OUTPUT_GRAD_MEAN, INPUT_FACTOR, OUTPUT_GRAD_FACTOR)
EVA_STATISTICS = (INPUT_MEAN, OUTPUT_GRAD_MEAN)
FACTORS = (INPUT_FACTOR, OUTPUT_GRAD_FACTOR)

#: What a row of the factors A and G is: ``'positions'`` (every position of
#: every sample, KFC's Ω ⊗ Γ; the default) or ``'samples'`` (one row per sample,
#: the mean over its positions, G from the gradient of the mean loss: the
#: authors' K-FAC).
_FACTOR_ROWS = ("positions", "samples")


def check_factor_rows(factor_rows: Any) -> str:
  if factor_rows not in _FACTOR_ROWS:
    raise ValueError(f"factor_rows must be one of {_FACTOR_ROWS}; got {factor_rows!r}")
  return factor_rows


def statistic_shapes(
  stack: tuple[int, ...], in_dim: int, out_dim: int, has_bias: bool
) -> dict[str, tuple[int, ...]]:
  """The shape of every statistic of a layer: ``{name: shape}``.

  The bias adds the trailing 1 of â to A only; ā itself is stored without it.
  """
  n_in = in_dim + (1 if has_bias else 0)
  return {
    INPUT_MEAN: stack + (in_dim,),
    OUTPUT_GRAD_MEAN: stack + (out_dim,),
    INPUT_FACTOR: stack + (n_in, n_in),
    OUTPUT_GRAD_FACTOR: stack + (out_dim, out_dim),
  }


class WithBiasRow(NamedTuple):
  """A layer's square matrix over â = [a, 1] (K-FAC's A, its inverse), as stored.

  The running A of a layer with a bias is ``stack + (in + 1, in + 1)``: a
  side that no mesh axis divides (jax splits arrays evenly only). The state
  keeps it as its first ``in`` rows and its last row, so that the rows split
  over the devices (:func:`eva_optax._src.sharding.statistic_spec`) and only
  the bias row is replicated. :func:`together` gives the matrix back.

  Attributes:
    rows: ``stack + (in, in + 1)``, the rows of the kernel's inputs.
    bias_row: ``stack + (in + 1,)``, the row of the bias.
  """

  rows: jax.Array
  bias_row: jax.Array

  def matrix(self) -> jax.Array:
    """The whole ``stack + (in + 1, in + 1)`` matrix."""
    return jnp.concatenate([self.rows, self.bias_row[..., None, :]], axis=-2)


def is_with_bias_row(x: Any) -> bool:
  return isinstance(x, WithBiasRow)


def keeps_bias_row_apart(
  stack: tuple[int, ...], in_dim: int, has_bias: bool, shape: tuple[int, ...]
) -> bool:
  """Whether a per-layer entry of ``shape`` is stored as a :class:`WithBiasRow`:
  a square matrix of side ``in + 1`` of a layer with a bias."""
  side = in_dim + 1
  return has_bias and tuple(shape) == tuple(stack) + (side, side)


def apart(matrix: jax.Array) -> WithBiasRow:
  """``matrix`` (``… × (n, n)``) as its first ``n - 1`` rows and its last row."""
  return WithBiasRow(matrix[..., :-1, :], matrix[..., -1, :])


def together(stored: Any) -> jax.Array:
  """The matrix of a :class:`WithBiasRow` (any other array as it is)."""
  return stored.matrix() if isinstance(stored, WithBiasRow) else stored


def stored_shape(stored: Any) -> tuple[int, ...]:
  """The shape of the matrix ``stored`` holds."""
  if isinstance(stored, WithBiasRow):
    return tuple(stored.bias_row.shape[:-1]) + (stored.bias_row.shape[-1],) * 2
  return tuple(stored.shape)


def statistic_dtype(param_dtype: Any) -> jnp.dtype:
  """The precision of a layer's statistics: its parameters', at least float32.

  bfloat16 and float16 layers keep float32 statistics; float64 layers (with
  ``jax_enable_x64``) keep float64 ones, so that nothing is rounded to float32.
  """
  return jnp.promote_types(param_dtype, jnp.float32)


def requested(statistics: Sequence[str]) -> tuple[str, ...]:
  """``statistics`` as a tuple, checked: a non-empty subset of :data:`STATISTICS`."""
  statistics = tuple(statistics)
  if not statistics or set(statistics) - set(STATISTICS):
    raise ValueError(f"statistics must be a non-empty subset of {STATISTICS}; got {statistics!r}")
  return statistics


class KernelLayout(NamedTuple):
  """How the axes of a kernel split into ``stack + inputs + outputs``.

  Attributes:
    stack_ndim: number of leading stacked-layer axes (``nn.scan``), default 0.
    output_ndim: number of trailing output (feature) axes, default 1.
    permutation: the order of the kernel's axes that puts them as
      ``stack + inputs + outputs`` (an Einsum kernel such as ``'NDH'`` for
      ``'BTD,NDH->BTNH'`` is ``(1, 0, 2)``: input D, outputs N and H), or
      ``None`` when they already are in that order (Dense, DenseGeneral, Conv).
    bias_axes: with a permutation, the kernel axes a bias spans, in the
      order of its entries (an Einsum adds its bias in the output's order);
      ``None``: the stack and output axes in kernel order.
    groups: a grouped convolution's ``feature_group_count``: the kernel's
      last (output) axis splits into ``(groups, out/groups)`` and the group
      axis becomes the last stack axis (one independent layer per group).
  """

  stack_ndim: int = 0
  output_ndim: int = 1
  permutation: tuple[int, ...] | None = None
  bias_axes: tuple[int, ...] | None = None
  groups: int = 1

  def ordered(self, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel's shape in ``stack + inputs + outputs`` order."""
    if self.groups > 1:
      *rest, out = kernel_shape
      head = self.stack_ndim - 1
      return tuple(rest[:head]) + (self.groups,) + tuple(rest[head:]) + (out // self.groups,)
    if self.permutation is None:
      return tuple(kernel_shape)
    return tuple(kernel_shape[a] for a in self.permutation)

  def dims(self, kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """``(stack_shape, in_dim, out_dim)`` of a kernel of this layout."""
    shape = self.ordered(kernel_shape)
    stack = tuple(shape[: self.stack_ndim])
    inputs = shape[self.stack_ndim : len(shape) - self.output_ndim]
    outputs = shape[len(shape) - self.output_ndim :]
    return stack, math.prod(inputs), math.prod(outputs)

  def check(self, kernel_shape: tuple[int, ...], where: str) -> None:
    n_in = len(self.ordered(kernel_shape)) - self.stack_ndim - self.output_ndim
    bad_permutation = self.permutation is not None and sorted(self.permutation) != list(
      range(len(kernel_shape))
    )
    bad_groups = self.groups > 1 and (
      self.stack_ndim < 1 or self.output_ndim != 1 or kernel_shape[-1] % self.groups
    )
    if self.stack_ndim < 0 or self.output_ndim < 1 or n_in < 1 or bad_permutation or bad_groups:
      raise ValueError(
        f"{where}: layout {self} does not fit a kernel of shape {kernel_shape}"
        " (it needs at least one input and one output axis)"
      )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one layer (or one stack of layers), as captured.

  Attributes:
    input_mean: ā, shape ``stack + (in,)`` — mean input over batch and
      positions (for Conv: mean of the im2col patches), without the bias 1.
    output_grad_mean: ḡ, shape ``stack + (out,)`` — mean over batch and
      positions of the gradient of the (mean) loss w.r.t. the layer output.
    input_factor: K-FAC's A = E[â âᵀ] over rows (positions), with â = [a, 1]
      when the layer has a bias; ``stack + (in[+1], in[+1])``.
    output_grad_factor: K-FAC's G = N·Σ_rows (∂L/∂y)(∂L/∂y)ᵀ for a loss that
      is a mean over N samples; ``stack + (out, out)``.
    Statistics that were not captured are ``None``.
    kind: ``'Dense'``, ``'DenseGeneral'`` or ``'Conv'`` (static).
    layout: the :class:`KernelLayout` of the layer's kernel (static).
    has_bias: whether the layer has a bias (static).
    factor_rows: what a row of A and G was (``'positions'`` or ``'samples'``, static).
  """

  input_mean: jax.Array | None
  output_grad_mean: jax.Array | None
  input_factor: jax.Array | None = None
  output_grad_factor: jax.Array | None = None
  kind: str = dataclasses.field(metadata=dict(static=True), default="Dense")
  layout: KernelLayout = dataclasses.field(metadata=dict(static=True), default=KernelLayout())
  has_bias: bool = dataclasses.field(metadata=dict(static=True), default=True)
  factor_rows: str = dataclasses.field(metadata=dict(static=True), default="positions")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PassThrough:
  """A layer the capture saw but does not precondition, and why (no arrays)."""

  kind: str = dataclasses.field(metadata=dict(static=True))
  reason: str = dataclasses.field(metadata=dict(static=True))


def _is_layer_entry(x: Any) -> bool:
  return isinstance(x, (LayerStats, PassThrough))


def layer_entries(stats: Any) -> dict[Path, LayerStats | PassThrough]:
  """The captured entries of a stats tree, by module path."""
  return dict(flatten_with_paths(stats, is_leaf=_is_layer_entry))


def layouts_of(stats: Any) -> dict[str, Any]:
  """The :class:`KernelLayout` of every captured layer, keyed like ``stats``.

  Pass it as ``layouts=`` to an optimizer to size its state exactly, or for a
  layout its state has no room for (a grouped conv with several input channels
  per group; :func:`eva_optax.describe` says which)::

      _, _, stats = jax.eval_shape(grad_fn, params, batch)
      tx = eva_optax.eva(0.01, layouts=eva_optax.layouts_of(stats))
  """
  return nest({p: e.layout for p, e in layer_entries(stats).items() if isinstance(e, LayerStats)})
