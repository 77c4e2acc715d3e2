"""Many small contractions, computed where their operands live, in one all-reduce.

Eva's rule needs, per layer, a few contractions of the gradient matrix with
the curvature vectors (ḡᵀĜā, ‖Ĝ‖², ‖ā‖², Eva-f's Ĝā and column norms …): tiny
results from operands that, on a mesh, are sharded like the layer's kernel.
Left to XLA's partitioner, each contraction over a sharded axis is its own
all-reduce, and packing the vectors of layers of different shardings into one
array gathers them: collectives that grow with the depth of the model.

:func:`packed_sums` states the contractions as einsum equations and computes
them through one ``custom_partitioning`` op. On one device (or with every
operand replicated) it runs ``fused``, the caller's few-operation form of the
same sums. On a mesh, the partitioner hands the op the operands' shardings at
compile time: every device contracts its own blocks, writes its partial
results at their global offsets in one packed vector (zero from all but one
replica of a block, so that nothing is counted twice), and a single ``psum``
over the mesh adds them, whatever the number of layers.

Equations use explicit labels and ``->``; a label's sharding is the one of the
first operand of the equation that has it (list the kernel first): the other
operands are resharded to it, which for vectors costs vector-sized traffic.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def _parse(equation: str) -> tuple[list[str], str]:
  inputs, output = equation.replace(" ", "").split("->")
  return inputs.split(","), output


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _label_axes(
    equations: Sequence[str], specs: Sequence[PartitionSpec], counts: Sequence[int]
) -> list[dict[str, tuple[str, ...]]]:
  """Per equation, the mesh axes of each label: those of its first operand that has it."""
  out, k = [], 0
  for equation, n in zip(equations, counts):
    inputs, _ = _parse(equation)
    labels: dict[str, tuple[str, ...]] = {}
    for operand in inputs:
      spec = tuple(specs[k]) + (None,) * (len(operand) - len(specs[k]))
      for label, entry in zip(operand, spec):
        if label not in labels:
          labels[label] = _axes(entry)
      k += 1
    # A mesh axis may shard only one label of an equation.
    used: set[str] = set()
    for label in list(labels):
      axes = labels[label]
      if used.intersection(axes):
        labels[label] = ()
      used.update(labels[label])
    out.append(labels)
  return out


def _spec(labels: str, axes: dict[str, tuple[str, ...]]) -> PartitionSpec:
  return PartitionSpec(*[(axes[c] if len(axes[c]) > 1 else axes[c][0]) if axes[c] else None
                         for c in labels])


def _local_offset(size: int, axes: tuple[str, ...], mesh_shape: dict[str, int]) -> jax.Array:
  """Where this device's block of an axis of ``size`` sharded over ``axes`` starts."""
  index = jnp.zeros([], jnp.int32)
  for axis in axes:
    index = index * mesh_shape[axis] + jax.lax.axis_index(axis)
  shards = math.prod(mesh_shape[a] for a in axes)
  return index * (size // shards)


def _partitioned(equations, counts, shapes, body, mesh, arg_shapes, result_shape):
  mesh_shape = dict(mesh.shape)
  label_axes = _label_axes(equations, [s.sharding.spec for s in arg_shapes], counts)
  arg_specs = []
  for equation, axes in zip(equations, label_axes):
    for operand in _parse(equation)[0]:
      arg_specs.append(_spec(operand, axes))
  extras = len(arg_shapes) - len(arg_specs)
  arg_specs += [PartitionSpec()] * extras  # the finish's own arguments: replicated
  arg_shardings = tuple(NamedSharding(mesh, s) for s in arg_specs)
  active = tuple(a for a, n in mesh_shape.items() if n > 1)

  def lower(*operands):
    pieces, k = [], 0
    for equation, n, axes, shape in zip(equations, counts, label_axes, shapes):
      inputs, output = _parse(equation)
      local = jnp.einsum(equation, *operands[k : k + n], precision=jax.lax.Precision.HIGHEST)
      k += n
      local = local.astype(body.dtype)
      if local.shape != tuple(shape):
        starts = [_local_offset(size, axes[c], mesh_shape) for c, size in zip(output, shape)]
        local = jax.lax.dynamic_update_slice(jnp.zeros(shape, body.dtype), local, starts)
      used = {a for c in set("".join(inputs)) for a in axes.get(c, ())}
      for axis in active:
        if axis not in used:  # a replica of the same block: count it once
          local = local * (jax.lax.axis_index(axis) == 0).astype(body.dtype)
      pieces.append(local.reshape(-1))
    packed = jnp.concatenate(pieces)
    packed = jax.lax.psum(packed, active) if active else packed
    return body.finish(packed, *operands[len(operands) - extras :])

  return mesh, lower, _replicated_like(mesh, result_shape), arg_shardings


def _replicated_like(mesh, result_shape):
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda _: replicated, result_shape)


def _replicated(equations, counts, shapes, body, mesh, arg_shapes, result_shape):
  del equations, counts, shapes, body, arg_shapes
  return _replicated_like(mesh, result_shape)


def _rule(equations, counts, shapes, body, mesh, arg_shapes, result_shape) -> str:
  del equations, counts, shapes, body, mesh
  # Every axis its own factor: the op follows its operands' shardings and never
  # asks the partitioner to reshard the large ones; each result is free to be
  # sliced into whatever sharding its users want (a local slice of a replica).
  names = (f"f{i}" for i in range(10**6))
  side = lambda shapes: ", ".join(" ".join(next(names) for _ in s.shape) for s in shapes)
  results = result_shape if isinstance(result_shape, (tuple, list)) else [result_shape]
  return f"{side(arg_shapes)} -> {side(results)}"


class _Body(NamedTuple):
  """What the op runs besides the contractions (static; compared by identity)."""

  fused: Callable[..., jax.Array]  # the terms' operands -> the packed sums
  finish: Callable[..., jax.Array]  # (packed sums, *extras) -> the op's result
  dtype: Any
  extras: int

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


@functools.partial(custom_partitioning, static_argnums=(0, 1, 2, 3))
def _packed(equations, counts, shapes, body, *operands):
  n = len(operands) - body.extras
  return body.finish(body.fused(*operands[:n]).astype(body.dtype), *operands[n:])


_packed.def_partition(
    partition=_partitioned,
    infer_sharding_from_operands=_replicated,
    sharding_rule=_rule,
)


def stack_labels(kernel: jax.Array) -> str:
  """Equation labels for the stack axes of a ``stack + (in, out)`` matrix (not ``i``, ``o``)."""
  return "abcdefgh"[: kernel.ndim - 2]


def packed_sums(
    terms: Sequence[tuple[str, Sequence[jax.Array]]],
    fused: Callable[..., jax.Array] | None = None,
    finish: Callable[..., jax.Array] | None = None,
    extras: Sequence[jax.Array] = (),
) -> jax.Array:
  """Every term's ``einsum(equation, *operands)``, flattened and packed, in one op.

  Args:
    terms: ``(equation, operands)`` pairs; explicit labels and ``->`` (for
      example ``"io,i,o->"``), the kernel first among the operands.
    fused: optional ``fused(*operands) -> packed`` (every term's operands in
      order; the same packed vector): the same sums in fewer operations, used
      on one device and wherever nothing is sharded.
    finish: optional ``finish(packed, *extras) -> result``: work on the packed
      sums, done inside the op on every device (so that it stays replicated,
      whatever the shardings of the arrays its result meets next); a tuple of
      arrays is several results, each sliced where its users need it (one
      packed vector would be sharded as a whole and sliced with collectives).
    extras: small arrays ``finish`` needs (a damping), replicated.

  Returns:
    The packed vector (the terms' results flattened one after the other), or
    ``finish`` of it (an array or a tuple of arrays); replicated on a mesh.
  """
  equations = tuple(e.replace(" ", "") for e, _ in terms)
  operands = [x for _, ops in terms for x in ops]
  if not operands:
    raise ValueError("packed_sums needs at least one term")
  counts = tuple(len(ops) for _, ops in terms)
  dtype = jnp.result_type(*operands)
  shapes = tuple(
      jax.eval_shape(lambda *o, e=e: jnp.einsum(e, *o), *ops).shape for e, ops in terms
  )

  def default(*ops):
    out, k = [], 0
    for e, n in zip(equations, counts):
      out.append(jnp.einsum(e, *ops[k : k + n], precision=jax.lax.Precision.HIGHEST).reshape(-1))
      k += n
    return jnp.concatenate(out)

  body = _Body(fused or default, finish or (lambda packed: packed), dtype, len(extras))
  return _packed(
      equations, counts, shapes, body, *[x.astype(dtype) for x in operands], *extras
  )
