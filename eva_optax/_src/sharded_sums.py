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
first operand of the equation that has it (list the kernel first). An operand
sharded otherwise (a vector split over more devices than its kernel), or one
the caller wants back whole, is gathered whole inside the op, all such
operands in one all-gather per set of mesh axes, and every term takes the
block it needs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def _parse(equation: str) -> tuple[list[str], str]:
  inputs, output = equation.replace(" ", "").split("->")
  return inputs.split(","), output


def _axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_entry(axes: tuple[str, ...]) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _spec_axes(spec: Any, ndim: int) -> tuple:
  return tuple(_axes(e) for e in tuple(spec)) + ((),) * (ndim - len(tuple(spec)))


def _whole(equations, indices, actual) -> set[int]:
  """The operands taken whole: replicated ones, and every operand whose axes differ
  from those of the term's first operand with the same label that is not whole (a
  vector split over more devices than its kernel)."""
  whole = {u for u, spec in enumerate(actual) if not any(spec)}
  changed = True
  while changed:
    changed = False
    for equation, term in zip(equations, indices):
      labels: dict[str, tuple[str, ...]] = {}
      for operand, u in zip(_parse(equation)[0], term):
        if u in whole:
          continue
        for label, axes in zip(operand, actual[u]):
          if labels.setdefault(label, axes) != axes:
            whole.add(u)
            changed = True
  return whole


def _label_axes(equations, indices, actual, whole) -> list[dict[str, tuple[str, ...]]]:
  """Per term, the mesh axes of each label: those of its first operand that has it and
  is not whole; a mesh axis shards at most one label of a term."""
  labels_of = []
  for equation, term in zip(equations, indices):
    labels: dict[str, tuple[str, ...]] = {}
    for operand, u in zip(_parse(equation)[0], term):
      if u not in whole:
        for label, axes in zip(operand, actual[u]):
          labels.setdefault(label, axes)
    used: set[str] = set()
    for label in list(labels):
      if used.intersection(labels[label]):
        labels[label] = ()
      used.update(labels[label])
    labels_of.append(labels)
  return labels_of


def _local_offset(size: int, axes: tuple[str, ...], mesh_shape: dict[str, int]) -> jax.Array:
  """Where this device's block of an axis of ``size`` sharded over ``axes`` starts."""
  index = jnp.zeros([], jnp.int32)
  for axis in axes:
    index = index * mesh_shape[axis] + jax.lax.axis_index(axis)
  shards = math.prod(mesh_shape[a] for a in axes)
  return index * (size // shards)


def _local_block(x: jax.Array, spec: Sequence[tuple[str, ...]], mesh_shape: dict[str, int]):
  """This device's block of a whole array, for ``spec`` (axes per dimension)."""
  if not any(spec):
    return x
  sizes = [n // math.prod(mesh_shape[a] for a in axes) for n, axes in zip(x.shape, spec)]
  starts = [_local_offset(n, axes, mesh_shape) for n, axes in zip(x.shape, spec)]
  return jax.lax.dynamic_slice(x, starts, sizes)


def _regroup(part: jax.Array, spec, order: list[str], mesh_shape: dict[str, int]) -> jax.Array:
  """Gathered blocks ``(devices,) + block`` (devices over ``order``) as the whole array."""
  block = part.shape[1:]
  part = part.reshape(tuple(mesh_shape[a] for a in order) + block)
  perm, shape = [], []
  for d, axes in enumerate(spec):
    perm += [order.index(a) for a in axes]
    perm.append(len(order) + d)
    shape.append(block[d] * math.prod(mesh_shape[a] for a in axes))
  return jnp.transpose(part, perm).reshape(shape)


def _gather_whole(operands, members, actual, mesh) -> dict[int, jax.Array]:
  """The whole of each operand in ``members`` (sharded alike): one all-gather for all."""
  mesh_shape = dict(mesh.shape)
  order = [a for a in mesh.axis_names if any(a in axes for axes in actual[members[0]])]
  flat = jnp.concatenate([operands[u].reshape(-1) for u in members])
  every = jax.lax.all_gather(flat, tuple(order), tiled=False).reshape(-1, flat.shape[0])
  out, offset = {}, 0
  for u in members:
    size = operands[u].size
    part = every[:, offset : offset + size].reshape((-1,) + operands[u].shape)
    offset += size
    out[u] = _regroup(part, actual[u], order, mesh_shape)
  return out


def _partitioned(equations, indices, shapes, body, mesh, arg_shapes, result_shape):
  mesh_shape = dict(mesh.shape)
  n = len(arg_shapes) - body.extras
  actual = [_spec_axes(s.sharding.spec, len(s.shape)) for s in arg_shapes[:n]]
  for u, arg in enumerate(arg_shapes[:n]):
    if any(
      size % math.prod(mesh_shape[a] for a in axes) for size, axes in zip(arg.shape, actual[u])
    ):
      # Split unevenly (the partitioner pads the last block): taken replicated, so
      # that no padding enters a sum. Correct, at the cost of gathering it.
      actual[u] = ((),) * len(arg.shape)
  whole = _whole(equations, indices, actual) | set(body.returns)  # returned: whole too
  labels_of = _label_axes(equations, indices, actual, whole)
  arg_shardings = (
    tuple(NamedSharding(mesh, PartitionSpec(*[_spec_entry(a) for a in spec])) for spec in actual)
    + (NamedSharding(mesh, PartitionSpec()),) * body.extras
  )  # the finish's: replicated
  active = tuple(a for a, size in mesh_shape.items() if size > 1)

  def lower(*operands):
    operands = list(operands)
    groups: dict[tuple, list[int]] = {}
    for u in sorted(whole):
      if any(actual[u]):
        groups.setdefault(tuple(a for axes in actual[u] for a in axes), []).append(u)
    full = {}
    for members in groups.values():
      full.update(_gather_whole(operands, members, actual, mesh))
    pieces = []
    for equation, term, labels, shape in zip(equations, indices, labels_of, shapes):
      inputs, output = _parse(equation)
      local_operands = [
        _local_block(full.get(u, operands[u]), [labels.get(c, ()) for c in operand], mesh_shape)
        if u in whole
        else operands[u]
        for operand, u in zip(inputs, term)
      ]
      local = jnp.einsum(equation, *local_operands, precision=jax.lax.Precision.HIGHEST)
      local = local.astype(body.dtype)
      if local.shape != tuple(shape):
        starts = [
          _local_offset(size, labels.get(c, ()), mesh_shape) for c, size in zip(output, shape)
        ]
        local = jax.lax.dynamic_update_slice(jnp.zeros(shape, body.dtype), local, starts)
      used = {a for c in set("".join(inputs)) for a in labels.get(c, ())}
      for axis in active:
        if axis not in used:  # a replica of the same block: count it once
          local = local * (jax.lax.axis_index(axis) == 0).astype(body.dtype)
      pieces.append(local.reshape(-1))
    packed = jnp.concatenate(pieces)
    packed = jax.lax.psum(packed, active) if active else packed
    result = body.finish(packed, *operands[n:])
    if not body.returns:
      return result
    return (result,) + tuple(full.get(u, operands[u]) for u in body.returns)

  return mesh, lower, _replicated_like(mesh, result_shape), arg_shardings


def _replicated_like(mesh, result_shape):
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda _: replicated, result_shape)


def _replicated(equations, indices, shapes, body, mesh, arg_shapes, result_shape):
  del equations, indices, shapes, body, arg_shapes
  return _replicated_like(mesh, result_shape)


def _rule(equations, indices, shapes, body, mesh, arg_shapes, result_shape) -> str:
  del equations, indices, shapes, body, mesh
  # Every axis its own factor: the op follows its operands' shardings and never
  # asks the partitioner to reshard the large ones; each result is free to be
  # sliced into whatever sharding its users want (a local slice of a replica).
  names = (f"f{i}" for i in range(10**6))
  side = lambda shapes: ", ".join(" ".join(next(names) for _ in s.shape) for s in shapes)
  results = result_shape if isinstance(result_shape, (tuple, list)) else [result_shape]
  return f"{side(arg_shapes)} -> {side(results)}"


class _Body(NamedTuple):
  """What the op runs besides the contractions (static; compared by identity)."""

  fused: Callable[..., jax.Array]  # every term's operands, in order -> the packed sums
  finish: Callable[..., jax.Array]  # (packed sums, *extras) -> the op's result
  dtype: Any
  extras: int
  returns: tuple[int, ...] = ()  # operands (unique positions) also returned, whole

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


@functools.partial(custom_partitioning, static_argnums=(0, 1, 2, 3))
def _packed(equations, indices, shapes, body, *operands):
  n = len(operands) - body.extras
  per_term = [operands[u] for term in indices for u in term]
  result = body.finish(body.fused(*per_term).astype(body.dtype), *operands[n:])
  if not body.returns:
    return result
  return (result,) + tuple(operands[u] for u in body.returns)


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
  returns: Sequence[tuple[int, int]] = (),
) -> Any:
  """Every term's ``einsum(equation, *operands)``, flattened and packed, in one op.

  Args:
    terms: ``(equation, operands)`` pairs; explicit labels and ``->`` (for
      example ``"io,i,o->"``), the kernel first among the operands. An array
      used by several terms is one operand of the op.
    fused: optional ``fused(*operands) -> packed`` (every term's operands in
      order; the same packed vector): the same sums in fewer operations, used
      on one device and wherever nothing is sharded.
    finish: optional ``finish(packed, *extras) -> result``: work on the packed
      sums, done inside the op on every device (so that it stays replicated,
      whatever the shardings of the arrays its result meets next); a tuple of
      arrays is several results, each sliced where its users need it (one
      packed vector would be sharded as a whole and sliced with collectives).
    extras: small arrays ``finish`` needs (a damping), replicated.
    returns: ``(term, operand)`` positions of operands to return whole as well
      (vectors sharded otherwise than their kernel, gathered in the same
      all-gather as the op's own; replicated).

  Returns:
    The packed vector (the terms' results flattened one after the other), or
    ``finish`` of it (an array or a tuple of arrays); replicated on a mesh.
    With ``returns``: ``(result, *operands)``.
  """
  if not terms:
    raise ValueError("packed_sums needs at least one term")
  equations = tuple(e.replace(" ", "") for e, _ in terms)
  dtype = jnp.result_type(*[x for _, ops in terms for x in ops])
  unique: list[jax.Array] = []
  position: dict[int, int] = {}
  indices = []
  for _, ops in terms:
    term = []
    for x in ops:
      if id(x) not in position:
        position[id(x)] = len(unique)
        unique.append(x)
      term.append(position[id(x)])
    indices.append(tuple(term))
  indices = tuple(indices)
  shapes = tuple(jax.eval_shape(lambda *o, e=e: jnp.einsum(e, *o), *ops).shape for e, ops in terms)

  def default(*ops):
    out, k = [], 0
    for e, term in zip(equations, indices):
      out.append(
        jnp.einsum(e, *ops[k : k + len(term)], precision=jax.lax.Precision.HIGHEST).reshape(-1)
      )
      k += len(term)
    return jnp.concatenate(out)

  returned = tuple(indices[t][o] for t, o in returns)
  body = _Body(fused or default, finish or (lambda packed: packed), dtype, len(extras), returned)
  return _packed(equations, indices, shapes, body, *[x.astype(dtype) for x in unique], *extras)


def _wall_partition(mesh, arg_shapes, result_shape):
  del result_shape
  shardings = tuple(s.sharding for s in arg_shapes)  # each result as its operand: no work
  return mesh, lambda *arrays: tuple(arrays), shardings, shardings


def _wall_infer(mesh, arg_shapes, result_shape):
  del mesh, result_shape
  return tuple(s.sharding for s in arg_shapes)


def _wall_rule(mesh, arg_shapes, result_shape) -> str:
  del mesh, result_shape
  names = (f"f{i}" for i in range(10**6))
  side = lambda shapes: ", ".join(" ".join(next(names) for _ in s.shape) for s in shapes)
  return f"{side(arg_shapes)} -> {side(arg_shapes)}"


@custom_partitioning
def _wall_op(*arrays):
  return tuple(arrays)


_wall_op.def_partition(
  partition=_wall_partition, infer_sharding_from_operands=_wall_infer, sharding_rule=_wall_rule
)


def wall(arrays: Sequence[jax.Array]) -> list[jax.Array]:
  """``arrays`` unchanged, and a wall for the partitioner's sharding propagation.

  The captured statistics meet the state (split over the devices) in the running
  average: left free, the partitioner carries that split back into the capture,
  and from there into the activations it averages, which it then gathers. Through
  this op neither side's sharding reaches the other: each array keeps the
  sharding the capture gave it (a refinement to the state's split is then a local
  slice). The identity, with no work, on one device as on a mesh.
  """
  arrays = list(arrays)
  if not arrays:
    return []
  return list(_wall_op(*arrays))


class Blocks(NamedTuple):
  """Where an array of a given sharding lies over the devices of a mesh.

  Attributes:
    block: the shape each device holds.
    rows: per device (its position over the mesh's axes of more than one
      device, row-major, as ``all_gather`` over them orders it), the start
      of its block.
    distinct: ``(row, start)`` of one device per distinct block.
  """

  block: tuple[int, ...]
  rows: tuple[tuple[int, ...], ...]
  distinct: tuple[tuple[int, tuple[int, ...]], ...]


def blocks_of(sharding: Any, shape: Sequence[int], mesh) -> Blocks | None:
  """The :class:`Blocks` of an array of ``shape`` with ``sharding`` (any, as
  the partitioner hands it, even one that names no mesh axis), or ``None``
  when every device holds it whole or it is split unevenly."""
  shape = tuple(shape)
  if sharding is None or sharding.is_fully_replicated:
    return None
  try:
    block = tuple(sharding.shard_shape(shape))
  except ValueError:  # split unevenly
    return None
  indices = {d.id: idx for d, idx in sharding.devices_indices_map(shape).items()}
  starts = []
  for device in np.asarray(mesh.devices).reshape(-1):
    idx = indices[device.id]
    starts.append(tuple(0 if sl.start is None else sl.start for sl in idx))
  distinct: dict[tuple[int, ...], int] = {}
  for row, start in enumerate(starts):
    distinct.setdefault(start, row)
  return Blocks(block, tuple(starts), tuple((row, start) for start, row in distinct.items()))


def gather_blocks(
  operands: Sequence[jax.Array], blocks: Sequence[Blocks | None], active
) -> list[jax.Array]:
  """Inside a partitioned op: every operand whole, all in one all-gather over
  ``active`` (the mesh axes of more than one device, in mesh order)."""
  out = list(operands)
  split = [u for u, b in enumerate(blocks) if b is not None]
  if not split:
    return out
  flat = jnp.concatenate([out[u].reshape(-1) for u in split])
  every = jax.lax.all_gather(flat, tuple(active), tiled=False).reshape(-1, flat.shape[0])
  offset = 0
  for u in split:
    b = blocks[u]
    size = math.prod(b.block)
    whole_shape = tuple(max(start[d] for start in b.rows) + b.block[d] for d in range(len(b.block)))
    x = jnp.zeros(whole_shape, out[u].dtype)
    for row, start in b.distinct:
      x = jax.lax.dynamic_update_slice(
        x, every[row, offset : offset + size].reshape(b.block), start
      )
    out[u] = x
    offset += size
  return out


def scatter_blocks(
  values: Sequence[jax.Array], blocks: Sequence[Blocks | None], active
) -> list[jax.Array]:
  """Inside a partitioned op: the sum over the devices of each value, every device
  getting its block of it (whole where ``blocks`` is ``None``), in one reduce-scatter."""
  parts = []
  for value, b in zip(values, blocks):
    if b is None:
      parts.append(None)
      continue
    rows = [jax.lax.dynamic_slice(value, start, b.block).reshape(-1) for start in b.rows]
    parts.append(jnp.stack(rows))
  n = next((p.shape[0] for p in parts if p is not None), None)
  dtype = jnp.result_type(*values)
  if n is None:  # nothing split: a plain sum
    summed = jax.lax.psum([v.astype(dtype) for v in values], tuple(active))
    return [s.astype(v.dtype) for s, v in zip(summed, values)]
  parts = [
    jnp.broadcast_to(v.reshape(1, -1), (n, v.size)) if p is None else p
    for v, p in zip(values, parts)
  ]
  mine = jax.lax.psum_scatter(
    jnp.concatenate([p.astype(dtype) for p in parts], axis=1),
    tuple(active),
    scatter_dimension=0,
    tiled=False,
  )
  out, offset = [], 0
  for value, part, b in zip(values, parts, blocks):
    shape = value.shape if b is None else b.block
    out.append(mine[offset : offset + part.shape[1]].reshape(shape).astype(value.dtype))
    offset += part.shape[1]
  return out


def _whole_partition(mesh, arg_shapes, result_shape):
  del result_shape
  blocks = [blocks_of(a.sharding, a.shape, mesh) for a in arg_shapes]
  active = [a for a, size in mesh.shape.items() if size > 1]
  replicated = NamedSharding(mesh, PartitionSpec())
  # Each operand as it comes (whatever the partitioner made of it), unless split
  # unevenly: that one taken whole.
  arg_shardings = tuple(
    a.sharding if b is not None or a.sharding.is_fully_replicated else replicated
    for a, b in zip(arg_shapes, blocks)
  )
  lower = lambda *arrays: tuple(gather_blocks(arrays, blocks, active))
  return mesh, lower, _replicated_like(mesh, tuple(arg_shapes)), arg_shardings


@custom_partitioning
def _whole_op(*arrays):
  return tuple(arrays)


_whole_op.def_partition(
  partition=_whole_partition,
  infer_sharding_from_operands=lambda mesh, arg_shapes, result_shape: _replicated_like(
    mesh, tuple(arg_shapes)
  ),
  sharding_rule=_wall_rule,
  decode_shardings=False,  # any sharding the partitioner chose, named by mesh axes or not
)


def whole(arrays: Sequence[jax.Array]) -> list[jax.Array]:
  """``arrays`` whole on every device: on a mesh, every one split over the
  devices comes in through one all-gather for all (instead of one each where
  its users need it). The identity on one device."""
  arrays = list(arrays)
  if not arrays:
    return []
  return list(_whole_op(*arrays))
