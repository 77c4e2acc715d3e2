"""Per-layer work done once across a mesh, by the device that owns the layer.

K-FAC's and FOOF's inverses (and any other per-layer function of a layer's
matrices) cost O(n³) per layer. Left to XLA's partitioner, a function of
factors split over the devices is computed whole on every device: the state
is distributed but the work is replicated. :func:`once_per_mesh` computes
``fn(layer)`` for every layer in one ``custom_partitioning`` op that
distributes the work the way the authors' distributed K-FAC and KAISA do:

1. every layer has one owner among the mesh's devices (:func:`owners`: the
   layers by decreasing cost, each to the least loaded device so far);
2. one all-gather brings every operand split over the devices in whole (a
   factor split by rows), for all layers together;
3. each device computes ``fn`` of the layers it owns only (``lax.cond`` on its
   index: the others' branch is not run) and zeros for the others;
4. one reduce-scatter (a sum over the devices in which only the owner's term
   is not zero) leaves every device exactly its block of each result, in the
   sharding of the operand of the same shape of that layer (an inverse where
   its factor is), replicated when no operand has its shape.

Two collectives per call, whatever the number of layers; each ``fn`` runs on
one device. On one device (or with nothing to split) it is ``fn`` of each
layer, as written.

References:
  Osawa et al. Large-scale distributed second-order optimization using
  Kronecker-factored approximate curvature for deep convolutional neural
  networks. CVPR 2019.
  Pauloski et al. KAISA: an adaptive second-order optimizer framework for deep
  neural networks. SC 2021.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from eva_optax._src.sharded_sums import blocks_of, gather_blocks, scatter_blocks


def owners(costs: Sequence[float], devices: int) -> list[int]:
  """The device that computes each layer: by decreasing cost (ties by position),
  each layer to the device with the least work so far (the lowest index on ties)."""
  load = [0.0] * devices
  owner = [0] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
    d = min(range(devices), key=lambda d: (load[d], d))
    owner[i] = d
    load[d] += costs[i]
  return owner


def cost(leaves: Sequence[Any]) -> float:
  """The work of a function of these matrices: Σ n³ over their trailing square axes."""
  return float(
    sum(math.prod(x.shape[:-2]) * x.shape[-1] ** 3 if x.ndim >= 2 else x.size for x in leaves)
  )


class _Body(NamedTuple):
  """The static part of the op (compared by identity)."""

  fns: tuple[Callable[..., Any], ...]  # one per layer
  layers: tuple[jax.tree_util.PyTreeDef, ...]  # each layer's operands
  sizes: tuple[int, ...]  # leaves per layer
  results: tuple[jax.tree_util.PyTreeDef, ...]  # each layer's result
  extras: int

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def _split(body: _Body, operands: Sequence[Any]) -> tuple[list[Any], list[Any]]:
  """The op's operands as one tree per layer, and the extras."""
  trees, start = [], 0
  for treedef, size in zip(body.layers, body.sizes):
    trees.append(jax.tree.unflatten(treedef, operands[start : start + size]))
    start += size
  return trees, list(operands[start:])


def _run_all(body: _Body, operands: Sequence[Any]) -> tuple[jax.Array, ...]:
  trees, extras = _split(body, operands)
  return tuple(
    leaf for fn, tree in zip(body.fns, trees) for leaf in jax.tree.leaves(fn(tree, *extras))
  )


@functools.partial(custom_partitioning, static_argnums=(0,))
def _op(body, *operands):
  return _run_all(body, operands)


def _placement(body: _Body, mesh, arg_shapes, result_shape):
  """The :class:`~eva_optax._src.sharded_sums.Blocks` of every operand and result
  (``None``: whole on every device), and the shardings to declare for them."""
  n = sum(body.sizes)
  replicated = NamedSharding(mesh, PartitionSpec())
  args, arg_shardings = [], []
  for a in arg_shapes[:n]:
    b = blocks_of(a.sharding, a.shape, mesh)
    args.append(b)
    # As the partitioner made it; taken whole if split unevenly.
    arg_shardings.append(a.sharding if b is not None else replicated)
  arg_shardings += [replicated] * (len(arg_shapes) - n)
  results, result_shardings = [], []
  start_arg, start_result = 0, 0
  flat_results = jax.tree.leaves(result_shape)
  for size, treedef in zip(body.sizes, body.results):
    own = list(range(start_arg, start_arg + size))
    for result in flat_results[start_result : start_result + treedef.num_leaves]:
      # Split like the layer's operand of the same shape, else whole everywhere.
      like = [u for u in own if tuple(arg_shapes[u].shape) == tuple(result.shape) and args[u]]
      results.append(args[like[0]] if like else None)
      result_shardings.append(arg_shardings[like[0]] if like else replicated)
    start_arg += size
    start_result += treedef.num_leaves
  return args, tuple(arg_shardings), results, tuple(result_shardings)


def _partition(body: _Body, mesh, arg_shapes, result_shape):
  mesh_shape = dict(mesh.shape)
  args, arg_shardings, results, result_shardings = _placement(body, mesh, arg_shapes, result_shape)
  active = [a for a in mesh.axis_names if mesh_shape[a] > 1]
  devices = math.prod(mesh_shape[a] for a in active)
  costs, start = [], 0
  for size in body.sizes:
    costs.append(cost(arg_shapes[start : start + size]))
    start += size
  owner = owners(costs, max(devices, 1))
  n = sum(body.sizes)

  def lower(*operands):
    operands = list(operands)
    if not active:
      return _run_all(body, operands)
    index = jnp.zeros([], jnp.int32)
    for a in active:
      index = index * mesh_shape[a] + jax.lax.axis_index(a)
    # 2. Every split operand whole, in one all-gather.
    operands[:n] = gather_blocks(operands[:n], args, active)
    trees, extras = _split(body, operands)
    # 3. Each layer on its owner only.
    computed = []
    for fn, tree, who in zip(body.fns, trees, owner):
      shapes = jax.eval_shape(lambda t: fn(t, *extras), tree)
      zeros = lambda shapes=shapes: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      value = jax.lax.cond(index == who, lambda t=tree, fn=fn: fn(t, *extras), zeros)
      computed += jax.tree.leaves(value)
    # 4. Every device its block of every result, in one reduce-scatter.
    return tuple(scatter_blocks(computed, results, active))

  return mesh, lower, result_shardings, arg_shardings


def _infer(body: _Body, mesh, arg_shapes, result_shape):
  return _placement(body, mesh, arg_shapes, result_shape)[3]


def _rule(body: _Body, mesh, arg_shapes, result_shape) -> str:
  del body, mesh
  # Every axis its own factor: the operands keep the state's split, and each
  # result gets the sharding the partition gives it.
  names = (f"f{i}" for i in range(10**6))
  side = lambda shapes: ", ".join(" ".join(next(names) for _ in s.shape) for s in shapes)
  return f"{side(arg_shapes)} -> {side(jax.tree.leaves(result_shape))}"


_op.def_partition(
  partition=_partition,
  infer_sharding_from_operands=_infer,
  sharding_rule=_rule,
  decode_shardings=False,  # any sharding the partitioner chose, named by mesh axes or not
)


def once_per_mesh(
  fn: Callable[..., Any] | Sequence[Callable[..., Any]],
  layers: Sequence[Any],
  extras: Sequence[jax.Array] = (),
) -> list[Any]:
  """``[fn(layer, *extras) for layer in layers]``, each computed on one device.

  Args:
    fn: a function of one layer's tree of arrays (and the extras) to a tree
      of arrays (its shapes may differ from layer to layer), or one such
      function per layer.
    layers: one tree of arrays per layer.
    extras: small arrays every call needs (a damping), replicated.

  Returns:
    One result tree per layer. On a mesh, each result leaf is split like the
    operand of its layer with the same shape (an inverse like its factor),
    replicated when there is none.
  """
  layers = list(layers)
  if not layers:
    return []
  flat = [jax.tree.flatten(layer) for layer in layers]
  fns = tuple(fn) if isinstance(fn, (list, tuple)) else (fn,) * len(layers)
  if len(fns) != len(layers):
    raise ValueError(f"once_per_mesh: {len(fns)} functions for {len(layers)} layers")
  results = [jax.eval_shape(lambda t, f=f: f(t, *extras), layer) for f, layer in zip(fns, layers)]
  body = _Body(
    fns,
    tuple(treedef for _, treedef in flat),
    tuple(len(leaves) for leaves, _ in flat),
    tuple(jax.tree.structure(r) for r in results),
    len(extras),
  )
  out = _op(body, *[x for leaves, _ in flat for x in leaves], *extras)
  trees, start = [], 0
  for treedef in body.results:
    trees.append(jax.tree.unflatten(treedef, out[start : start + treedef.num_leaves]))
    start += treedef.num_leaves
  return trees
