"""Where the optimizer state lives when the parameters are sharded over a mesh.

Every statistic of a layer follows its kernel: ā is sharded like the kernel's
input axes, ḡ like its output axes, and every per-layer entry (a factor, an
inverse, a scalar) like the kernel's stack axes, replicated over the rest
(:func:`statistic_spec`). No buffer the size of a kernel axis then sits on
more devices than the kernel itself, and the rule's work on a layer
(:mod:`eva_optax.sharded_sums`) finds its operands where the kernel's blocks
are. Counts and other scalars are replicated.

:func:`place` puts a freshly built state there when ``init`` is called
eagerly on parameters placed with a :class:`jax.sharding.NamedSharding`;
under ``jit``/``eval_shape`` (traced parameters) the state is left to the
caller's shardings, which :func:`eva_optax.state_shardings` gives.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from eva_optax._src.statistics import INPUT_MEAN, OUTPUT_GRAD_MEAN, KernelLayout


def _sharding(leaf: Any) -> Any:
  if isinstance(leaf, jax.core.Tracer):
    return None
  if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
    return getattr(leaf, "sharding", None)
  return None


def params_mesh(params: Any) -> jax.sharding.Mesh | None:
  """The mesh of the first concrete parameter placed with a ``NamedSharding``, if any."""
  for leaf in jax.tree.leaves(params):
    sharding = _sharding(leaf)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def spec_of(leaf: Any) -> PartitionSpec | None:
  """The ``PartitionSpec`` of a parameter placed with a ``NamedSharding`` (else ``None``)."""
  sharding = _sharding(leaf)
  return sharding.spec if isinstance(sharding, NamedSharding) else None


def _merged(entries: Sequence[Any]) -> Any:
  """The spec entry of axes merged into one (row-major): the first axis's entry when
  the others are unsharded (its blocks stay contiguous), else ``None``."""
  if not entries:
    return None
  return entries[0] if all(e is None for e in entries[1:]) else None


def statistic_spec(
  kernel_spec: PartitionSpec | None,
  kernel_ndim: int,
  layout: KernelLayout,
  name: str,
  mesh_shape: dict[str, int] | None = None,
  length: int | None = None,
) -> PartitionSpec:
  """Where a layer's statistic ``name`` lives, from its kernel's ``PartitionSpec``.

  ā (``input_mean``): the stack axes, then the input axes merged; ḡ
  (``output_grad_mean``): the stack axes, then the output axes merged. A
  vector (ā, ḡ of ``length`` entries) is then split further over the other
  mesh axes (``mesh_shape``), as far as its length divides: it is on no more
  devices than needed, and the rule gathers every such vector of the model in
  one all-gather (:mod:`eva_optax.sharded_sums`). Replicated when the kernel
  is, or for a grouped convolution (whose stack axis is cut out of the output
  axis).

  Any other per-layer entry (a factor or an inverse of ``length`` rows): the
  stack axes, then its rows split like the kernel's input axes (a name
  starting with ``input``) or output axes (``output``) where they divide
  ``length``, then over the mesh's other axes as far as ``length`` divides;
  its columns whole. No device then holds more than its share of a
  factor, and :func:`eva_optax._src.once_per_mesh.once_per_mesh` inverts
  each on one device.
  """
  if kernel_spec is None or layout.groups > 1:
    return PartitionSpec()
  entries = tuple(kernel_spec) + (None,) * (kernel_ndim - len(kernel_spec))
  order = layout.permutation or tuple(range(kernel_ndim))
  ordered = [entries[a] for a in order]
  stack = ordered[: layout.stack_ndim]
  inputs = ordered[layout.stack_ndim : kernel_ndim - layout.output_ndim]
  outputs = ordered[kernel_ndim - layout.output_ndim :]
  vector = name in (INPUT_MEAN, OUTPUT_GRAD_MEAN)
  if vector:
    entry = _merged(inputs if name == INPUT_MEAN else outputs)
  elif not (mesh_shape and length):
    return PartitionSpec(*stack)
  else:
    side = inputs if name.startswith("input") else outputs if name.startswith("output") else []
    entry = _merged(side)
    if length % math.prod(mesh_shape.get(a, 1) for a in _axes(entry)):
      entry = None
  if mesh_shape and length:
    taken = {a for e in stack for a in _axes(e)}
    axes = list(_axes(entry))
    for axis, size in mesh_shape.items():
      shards = math.prod(mesh_shape[a] for a in axes) * size
      if axis not in axes and axis not in taken and size > 1 and length % shards == 0:
        axes.append(axis)
    entry = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
  return PartitionSpec(*stack, entry)


def _axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def place(params: Any, state: Any, specs: Any = None) -> Any:
  """``state`` placed on the parameters' mesh, leaf by leaf as ``specs`` says
  (a tree of ``PartitionSpec`` matching ``state``, or a prefix of it; default:
  replicated); unchanged without a concrete mesh or under tracing."""
  mesh = params_mesh(params)
  if mesh is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
    return state
  if specs is None:
    return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  shardings = jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  return jax.device_put(state, shardings)


def replicate_on_params_mesh(params: Any, state: Any) -> Any:
  """``state`` replicated over the parameters' mesh; unchanged without one."""
  return place(params, state)


def is_placeholder(params: Any) -> bool:
  """Whether ``init`` was given a tree without leaves: ``optax.tree_map_params``
  calls ``init`` on such a placeholder to find the fields shaped like the params."""
  return not jax.tree.leaves(params)


def not_params_shaped() -> jax.Array:
  """What ``init`` on a placeholder returns for a field that is *not* shaped like
  the parameters (a tree keyed by layer, per-dimension entries): one leaf, so that
  ``optax.tree_map_params`` hands the whole field to ``transform_non_params``."""
  return jax.numpy.zeros([], jax.numpy.float32)
