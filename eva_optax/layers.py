"""Layer kinds: how a kernel becomes a matrix, and the statistics a layer carries.

One place decides how a parameter of a Dense, DenseGeneral or Conv layer is seen
as the matrix the preconditioners work on, for every optimizer of the library.

A kernel has the axes ``stack + inputs + outputs``:

* ``stack``: leading axes of layers stacked by ``nn.scan`` / ``nn.vmap`` (each
  index along them is its own layer with its own statistics);
* ``inputs``: the contracted axes (Dense: ``in``; DenseGeneral: the ``axis``
  dimensions in order; Conv: the window and the input channels, HWIO order);
* ``outputs``: the feature axes (one, or several for DenseGeneral).

:class:`KernelLayout` records the number of stack and output axes; the matrix
view of a kernel is then ``stack + (in, out)`` with ``in`` and ``out`` the
products of the input and output axes, which is a free reshape. A bias has the
axes ``stack + outputs`` and becomes the extra row of the matrix, matched by a
trailing 1 appended to the mean input.

Notation used across the library: ā (``input_mean``) is the mean layer input,
ḡ (``output_grad_mean``) the mean gradient of the loss w.r.t. the layer output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Path = tuple[str, ...]

KERNEL = "kernel"
BIAS = "bias"


class KernelLayout(NamedTuple):
  """How the axes of a kernel split into ``stack + inputs + outputs``.

  Attributes:
    stack_ndim: number of leading stacked-layer axes (``nn.scan``), default 0.
    output_ndim: number of trailing output (feature) axes, default 1.
  """

  stack_ndim: int = 0
  output_ndim: int = 1

  def dims(self, kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    """``(stack_shape, in_dim, out_dim)`` of a kernel of this layout."""
    stack = tuple(kernel_shape[: self.stack_ndim])
    inputs = kernel_shape[self.stack_ndim : len(kernel_shape) - self.output_ndim]
    outputs = kernel_shape[len(kernel_shape) - self.output_ndim :]
    return stack, math.prod(inputs), math.prod(outputs)

  def check(self, kernel_shape: tuple[int, ...], where: str) -> None:
    n_in = len(kernel_shape) - self.stack_ndim - self.output_ndim
    if self.stack_ndim < 0 or self.output_ndim < 1 or n_in < 1:
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
  """

  input_mean: jax.Array | None
  output_grad_mean: jax.Array | None
  input_factor: jax.Array | None = None
  output_grad_factor: jax.Array | None = None
  kind: str = dataclasses.field(metadata=dict(static=True), default="Dense")
  layout: KernelLayout = dataclasses.field(
      metadata=dict(static=True), default=KernelLayout()
  )
  has_bias: bool = dataclasses.field(metadata=dict(static=True), default=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PassThrough:
  """A layer the capture saw but does not precondition, and why (no arrays)."""

  kind: str = dataclasses.field(metadata=dict(static=True))
  reason: str = dataclasses.field(metadata=dict(static=True))


def is_layer_entry(x: Any) -> bool:
  return isinstance(x, (LayerStats, PassThrough))


def key_name(key: Any) -> str:
  """The readable name of one ``jax.tree_util`` path key."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_of(keys: tuple[Any, ...]) -> Path:
  """Names of the keys; the ``.value`` attribute of a Flax NNX variable is dropped,
  so an ``nnx.State`` of variables has the paths of the plain arrays."""
  return tuple(
      key_name(k)
      for k in keys
      if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")
  )


def path_str(path: Path) -> str:
  return "/".join(path)


def flatten_with_paths(tree: Any, is_leaf=None) -> list[tuple[Path, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_of(keys), leaf) for keys, leaf in leaves]


def layer_entries(stats: Any) -> dict[Path, LayerStats | PassThrough]:
  """The captured entries of a stats tree, by module path."""
  return dict(flatten_with_paths(stats, is_leaf=is_layer_entry))


def nest(flat: dict[Path, Any]) -> dict[str, Any]:
  """``{('a', 'b'): x}`` → ``{'a': {'b': x}}``."""
  if () in flat:
    return flat[()]
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out


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
    slots[module] = LayerSlot(module, layout, kernel_shape, bias is not None)
  return slots


def layouts_of(stats: Any) -> dict[str, Any]:
  """The :class:`KernelLayout` of every captured layer, keyed like ``stats``.

  Pass it as ``layouts=`` to an optimizer when a layout cannot be guessed from
  the parameters (stacked layers without bias, DenseGeneral without bias)::

      _, _, stats = jax.eval_shape(grad_fn, params, batch)
      tx = eva_optax.eva(0.1, layouts=eva_optax.layouts_of(stats))
  """
  return nest(
      {p: e.layout for p, e in layer_entries(stats).items() if isinstance(e, LayerStats)}
  )


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
  stack, in_dim, out_dim = slot.layout.dims(slot.kernel_shape)
  n_in = in_dim + (1 if slot.has_bias else 0)
  wanted = {
      "input_mean": stack + (in_dim,),
      "output_grad_mean": stack + (out_dim,),
      "input_factor": stack + (n_in, n_in),
      "output_grad_factor": stack + (out_dim, out_dim),
  }
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
