"""Shampoo with blocked statistics and SGD grafting: the baseline of the Eva papers.

Symbols: G — a parameter's gradient, seen as a tensor of rank k after merging
small dimensions; G_(i) — its matricisation along dimension i (that dimension
by all others); L_i — the statistic of dimension i; P_i — its inverse root;
ε — damping; β — ``stat_decay``; N — ``inverse_every``.

For every block of every parameter, and each of its k dimensions:

    L_i ← β·L_i + w·G_(i) G_(i)ᵀ        (w = 1 if β = 1, a sum; else 1 − β; L_i = 0 at init)
    P_i = (L_i + εI)^(−1/(2k))          recomputed at steps 0, N, 2N, …
    D   = G ×_1 P_1 ×_2 P_2 … ×_k P_k   (mode-i products)

and then SGD grafting per tensor: update = D · ‖G‖ / ‖D‖ (:mod:`eva_optax.grafting`).

Shapes (as in the authors' Shampoo, Google's reference PyTorch implementation
with ``best_effort_shape_interpretation``):

* **Merging.** Adjacent dimensions are merged while their product stays
  ≤ ``block_size``; dimensions of size 1 disappear (:func:`merge_small_dims`).
  An HWIO kernel (3, 3, 64, 128) becomes (9, 64, 128) and a (1, 300) kernel
  becomes (300,). A parameter whose merged rank is ≤ 1 (biases, norm scales,
  and small kernels such as (4, 8) → (32,)) is not preconditioned: it passes
  through unchanged, which is what SGD grafting would give it anyway.
* **Blocking.** Each merged dimension longer than ``block_size`` is cut into
  blocks of ``block_size`` and a shorter last block, and every block keeps its
  own L_1 … L_k (a (300, 7) parameter with ``block_size=128`` has three blocks,
  128 × 7, 128 × 7 and 44 × 7). In the state the last block is stored padded
  with zeros to the common block shape, so all blocks of a parameter are one
  batch for ``eigh``: the padded rows and columns of its statistics stay zero,
  L is block-diagonal, and the padded part never reaches the real entries of D.
  The result equals the uneven blocks exactly (up to rounding).
* **Grafting** is per tensor (over all its blocks), the reference's layer-wise
  SGD grafting: Shampoo fixes the direction, SGD the step length.

The statistics and the roots are float32 or wider: float64 for float64
parameters (with ``jax_enable_x64``), float32 for float32, bfloat16 and
float16 ones; ε and β are read in that dtype too. The roots are computed with
``jnp.linalg.eigh`` in the statistics' dtype (one matrix at a time on the CPU
backend, see :func:`eva_optax.linalg.per_matrix`), eigenvalues clipped at 0
before ε is added, inside ``jax.lax.cond`` on the step count, so
one compiled step serves refresh and non-refresh steps alike. The roots start
as identities and are first computed at step 0, from the first gradient's
statistics (the reference refreshes at its 1-indexed steps N, 2N, … and runs
the first N − 1 steps without preconditioning).

By default (``ridge='absolute'``) ε is **absolute**: P_i = (L_i + εI)^(−1/(2k));
the default 1e-6 is a floor that matters only for directions the gradients
have (almost) never visited; raise it with the gradient scale.

``ridge='authors'`` is the authors' rule (``shampoo/shampoo.py`` of
lzhangbv/eva: ``Preconditioner.__init__``, ``compute_preconditioners``, and
``matrix_functions.ComputePower``, Google's reference PyTorch Shampoo; their
ε = ``matrix_eps`` = 1e-12): the statistics start at εI, not 0, and at every
root refresh

    L_i ← L_i + ε·λ_max(L_i)·I,        P_i = L_i^(−1/(2k)),

where the ridge is added **into the stored statistic** (``mat_g += ...`` in
place), so it stays in L_i and accumulates over refreshes. λ_max here is the
exact largest eigenvalue, per block, from the same ``eigh`` in the
statistics' dtype (theirs is a power iteration stopped when its estimate
moves by < 1e-6; against their code in float64, with their Newton root
replaced by ``eigh``, the two leave < 2e-10 relative in the parameters after
8 steps of a small MLP and CNN). Not reproduced: their
roots come from a coupled Newton iteration (tolerance 1e-6), here from
``eigh``, and a block of size 1 in their uneven blocking gets the identity
as root, here the padded block gets a root like any other.

**Dimension order.** Merging depends on the order of the dimensions. A Flax
kernel is stored inputs first (HWIO for a convolution), a PyTorch one outputs
first (OIHW), and the authors' code merges the PyTorch order: a 3×3
convolution 3 → 8 is (27, 8) here and [72, 3] there (8·3·3 and 3).
``dim_order='torch'`` merges and blocks each kernel in the PyTorch order (the
update is returned in the stored order). For a 2-D kernel both orders give the
same update (D = P_out G P_in either way); for a convolution they differ.

The alias :func:`shampoo` is the authors' recipe: d = graft(D) + λW, Nesterov
momentum, learning rate. Their code (``shampoo/shampoo.py`` of lzhangbv/eva,
the weight decay step) adds λW twice to the parameters it does not
precondition (biases and other merged-rank-≤ 1 parameters: their Shampoo and
grafting directions are then the gradient tensor itself, and each adds λW to
it in place); ``decay_unpreconditioned_twice=True`` does the same. Its
``nesterov=True`` is not textbook Nesterov: ``nesterov='authors'``
(:mod:`eva_optax._src.alias`).

References:
  Gupta, Koren, Singer. Shampoo: Preconditioned Stochastic Tensor
  Optimization. ICML 2018.
  Anil, Gupta, Koren, Regan, Singer. Scalable Second Order Optimization for
  Deep Learning. arXiv:2002.09018.
  Agarwal, Anil, Hazan, Koren, Zhang. Disentangling Adaptive Gradient Methods
  from Learning Rates. arXiv:2002.11803.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, NamedTuple
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from eva_optax._src.alias import Nesterov, with_sgd
from eva_optax._src.hyper import check_period, check_range, value_at
from eva_optax._src.grafting import sgd_graft
from eva_optax._src.linalg import per_matrix
from eva_optax._src.once_per_mesh import once_per_mesh
from eva_optax._src.sharded_sums import whole
from eva_optax._src.sharding import is_placeholder, not_params_shaped, params_mesh, place

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Shapes: merging small dimensions and cutting blocks.


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
  """Merges adjacent dimensions while their product is ≤ ``max_dim``.

  Dimensions of size 1 disappear. Examples with ``max_dim=1024``:
  (1, 2, 512, 1, 2048, 1, 3, 4) → (1024, 2048, 12); (1, 2, 768, 1, 2048) →
  (2, 768, 2048).
  """
  merged, product = [], 1
  for d in shape:
    if product * d <= max_dim:
      product *= d
    else:
      if product > 1:
        merged.append(product)
      product = d
  if product > 1:
    merged.append(product)
  return tuple(merged)


class BlockLayout(NamedTuple):
  """How one parameter is cut into blocks (static, from its shape).

  Attributes:
    merged_shape: the shape after :func:`merge_small_dims` (rank k ≥ 2).
    block_shape: the shape of one (padded) block, ``min(d, block_size)`` per
      merged dimension.
    grid: the number of blocks along each merged dimension.
  """

  merged_shape: tuple[int, ...]
  block_shape: tuple[int, ...]
  grid: tuple[int, ...]

  @property
  def num_blocks(self) -> int:
    return math.prod(self.grid)

  @property
  def rank(self) -> int:
    return len(self.merged_shape)


def _dim_permutation(ndim: int, dim_order: str = "stored") -> tuple[int, ...]:
  """The axes of a rank-``ndim`` parameter in the order Shampoo merges them.

  ``'stored'``: as stored. ``'torch'``: PyTorch's order of a Flax kernel of
  rank ≥ 2, outputs, inputs, then the other axes: (…, I, O) → (O, I, …), i.e.
  HWIO → OIHW and (in, out) → (out, in). Rank ≤ 1 parameters keep their order.
  """
  if dim_order == "torch" and ndim >= 2:
    return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
  return tuple(range(ndim))


def block_layout(shape: Sequence[int], block_size: int) -> BlockLayout | None:
  """The blocks of a parameter of ``shape``; ``None`` when it passes through.

  A parameter passes through when its merged rank is ≤ 1 or it is empty.
  """
  if math.prod(shape) == 0:
    return None
  merged = merge_small_dims(shape, block_size)
  if len(merged) < 2:
    return None
  block = tuple(min(d, block_size) for d in merged)
  grid = tuple(-(-d // b) for d, b in zip(merged, block))
  return BlockLayout(merged, block, grid)


def _to_blocks(x: jax.Array, layout: BlockLayout) -> jax.Array:
  """``x`` as a batch of blocks, ``(num_blocks,) + block_shape`` (last blocks zero-padded)."""
  k = layout.rank
  x = x.reshape(layout.merged_shape)
  padding = [
    (0, n * b - d) for d, b, n in zip(layout.merged_shape, layout.block_shape, layout.grid)
  ]
  if any(p for _, p in padding):
    x = jnp.pad(x, padding)
  x = x.reshape([s for n, b in zip(layout.grid, layout.block_shape) for s in (n, b)])
  x = x.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
  return x.reshape((layout.num_blocks,) + layout.block_shape)


def _from_blocks(blocks: jax.Array, layout: BlockLayout, shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`_to_blocks`: drops the padding and restores ``shape``."""
  k = layout.rank
  x = blocks.reshape(layout.grid + layout.block_shape)
  x = x.transpose([j for i in range(k) for j in (i, k + i)])
  x = x.reshape([n * b for n, b in zip(layout.grid, layout.block_shape)])
  x = x[tuple(slice(0, d) for d in layout.merged_shape)]
  return x.reshape(shape)


# ---------------------------------------------------------------------------
# Statistics, roots and preconditioning of a batch of blocks.


def _block_statistics(blocks: jax.Array) -> tuple[jax.Array, ...]:
  """G_(i) G_(i)ᵀ for every block and dimension i: shapes ``(num_blocks, b_i, b_i)``."""
  k = blocks.ndim - 1
  axes = list(range(k + 1))  # 0: the block index
  stats = []
  for i in range(1, k + 1):
    other = list(axes)
    other[i] = k + 1
    stats.append(jnp.einsum(blocks, axes, blocks, other, [0, i, k + 1], precision=_HIGHEST))
  return tuple(stats)


def _eigen_root(
  statistic: jax.Array, exponent: int, ridge_of: Callable[[jax.Array], jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """(L + rI)^(−1/exponent) by one ``eigh`` in L's dtype (float32 or wider: float64
  for float64 statistics), eigenvalues clipped at 0 first, with r = ``ridge_of(λ)``
  per matrix (λ: L's eigenvalues, ascending); and r."""
  statistic = statistic.astype(jnp.promote_types(statistic.dtype, jnp.float32))
  eigenvalues, eigenvectors = per_matrix(jnp.linalg.eigh, statistic)
  ridge = ridge_of(eigenvalues).astype(statistic.dtype)
  scale = (jnp.maximum(eigenvalues, 0.0) + ridge[..., None]) ** (-1.0 / exponent)
  root = jnp.matmul(
    eigenvectors * scale[..., None, :], jnp.swapaxes(eigenvectors, -1, -2), precision=_HIGHEST
  )
  return root, ridge


def _inverse_root(statistic: jax.Array, damping: jax.Array, exponent: int) -> jax.Array:
  """(L + εI)^(−1/exponent), ε absolute (:func:`_eigen_root`)."""
  return _eigen_root(
    statistic, exponent, lambda e: jnp.broadcast_to(jnp.asarray(damping, e.dtype), e.shape[:-1])
  )[0]


def _authors_inverse_root(
  statistic: jax.Array, epsilon: jax.Array, exponent: int
) -> tuple[jax.Array, jax.Array]:
  """The authors' ridge: (L + rI)^(−1/exponent) with r = ε·λ_max(L) per matrix,
  and r (shape ``statistic.shape[:-2]``), which the caller adds to the stored L.

  λ_max is the largest eigenvalue of the same ``eigh`` (:func:`_eigen_root`); the
  eigenvalues of L + rI are those of L (clipped at 0) plus r.
  """
  return _eigen_root(statistic, exponent, lambda e: jnp.asarray(epsilon, e.dtype) * e[..., -1])


def _precondition_blocks(blocks: jax.Array, roots: Sequence[jax.Array]) -> jax.Array:
  """G ×_1 P_1 ×_2 … ×_k P_k for every block (P_i symmetric)."""
  k = blocks.ndim - 1
  axes = list(range(k + 1))
  for i, root in enumerate(roots, start=1):
    out = list(axes)
    out[i] = k + 1
    blocks = jnp.einsum(blocks, axes, root, [0, i, k + 1], out, precision=_HIGHEST)
  return blocks


# ---------------------------------------------------------------------------
# The transform.


class ScaleByShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: number of updates so far (int32).
    statistics: per parameter, a tuple over its merged dimensions of L_i with
      shape ``(num_blocks, b_i, b_i)`` (float32 or wider: the parameter's dtype
      when that is wider), or ``optax.MaskedNode()`` for parameters that pass
      through. Shapes fixed at ``init``; zeros there (εI with
      ``ridge='authors'``, whose refreshes add ε·λ_max·I to them).
    inverse_roots: P_i, the same structure, shapes and dtypes; identities at ``init``,
      refreshed at steps 0, N, 2N, …, each parameter's on one device of a mesh
      (:func:`~eva_optax._src.once_per_mesh.once_per_mesh`).

  On a mesh every L_i and P_i has its rows split over the devices
  (:func:`shampoo_state_specs`).
  """

  count: jax.Array
  statistics: Any
  inverse_roots: Any


def _block_matrix_spec(shape: Sequence[int], mesh_shape: dict[str, int]) -> Any:
  """Where a ``(num_blocks, b, b)`` statistic or root lives on a mesh: its rows
  split over the mesh axes (in mesh order) as far as ``b`` divides; else its
  blocks, as far as their number divides; else whole on every device."""
  for dim in (1, 0):
    axes, shards = [], 1
    for axis, size in mesh_shape.items():
      if size > 1 and shape[dim] % (shards * size) == 0:
        axes.append(axis)
        shards *= size
    if axes:
      entry = axes[0] if len(axes) == 1 else tuple(axes)
      return PartitionSpec(*([None] * dim), entry)
  return PartitionSpec()


def shampoo_state_specs(
  state: ScaleByShampooState, params: Any, split_matrices: bool = True
) -> ScaleByShampooState:
  """The ``PartitionSpec`` of every leaf of a Shampoo state on the parameters' mesh
  (:func:`_block_matrix_spec`; whole on every device unless ``split_matrices``;
  the count replicated)."""
  mesh = params_mesh(params)
  mesh_shape = dict(mesh.shape) if mesh is not None and split_matrices else {}
  masked = lambda x: isinstance(x, optax.MaskedNode)
  specs = lambda tree: jax.tree.map(
    lambda x: x if masked(x) else _block_matrix_spec(x.shape, mesh_shape), tree, is_leaf=masked
  )
  return ScaleByShampooState(PartitionSpec(), specs(state.statistics), specs(state.inverse_roots))


def scale_by_shampoo(
  *,
  block_size: int = 128,
  damping: optax.ScalarOrSchedule = 1e-6,
  stat_decay: optax.ScalarOrSchedule = 1.0,
  inverse_every: int | jax.Array = 10,
  dim_order: Literal["stored", "torch"] = "stored",
  ridge: Literal["absolute", "authors"] = "absolute",
) -> optax.GradientTransformationExtraArgs:
  """Blocked Shampoo's preconditioner with SGD grafting (no learning rate, no sign).

  Per block of every parameter whose merged rank k is ≥ 2:

      L_i ← β·L_i + w·G_(i) G_(i)ᵀ       (w = 1 if β = 1 else 1 − β),
      P_i = (L_i + εI)^(−1/(2k))         at steps 0, N, 2N, … (kept in between),
      update = D · ‖G‖ / ‖D‖,  D = G ×_1 P_1 … ×_k P_k   (per tensor).

  Other parameters pass through unchanged. See the module docstring for the
  merging of small dimensions and the blocks.

  Args:
    block_size: the largest statistic per dimension; longer (merged) dimensions
      are cut into blocks. A Python int ≥ 1. Default 128 (the paper's runs).
    damping: ε > 0, absolute, added to every L_i before the root; float or
      optax schedule (read at refresh steps). Default 1e-6.
    stat_decay: β ∈ [0, 1], weight of the old statistics. Default 1.0: sums
      over all steps, as Shampoo and the authors' runs do.
    inverse_every: N ≥ 1, steps between root refreshes. Default 10.
    dim_order: the order in which a parameter's dimensions are merged and
      blocked (:func:`_dim_permutation`): ``'stored'`` (default), or
      ``'torch'``, PyTorch's order of a kernel (HWIO → OIHW, (in, out) →
      (out, in)), as the authors' code merges it.
    ridge: how ε enters the roots. ``'absolute'`` (default): P_i =
      (L_i + εI)^(−1/(2k)). ``'authors'``: their rule (``shampoo/shampoo.py``
      and ``matrix_functions.ComputePower`` of lzhangbv/eva): L_i = εI at
      ``init``, and at each refresh L_i ← L_i + ε·λ_max(L_i)·I in the state
      (λ_max exact, per block), P_i = L_i^(−1/(2k)); pass their ε, 1e-12, as
      ``damping``. See the module docstring.

  Statistics, roots, ε and β are in the parameter's dtype when it is wider
  than float32 (float64), else float32.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs no
    ``stats`` and ignores extra arguments. Under ``optax.inject_hyperparams``
    pass ``static_args=('block_size',)``.

  References:
    Gupta, Koren, Singer. Shampoo: Preconditioned Stochastic Tensor
    Optimization. ICML 2018.
    Anil, Gupta, Koren, Regan, Singer. Scalable Second Order Optimization for
    Deep Learning. arXiv:2002.09018.
  """
  check_period("block_size", block_size, static=True)
  check_period("inverse_every", inverse_every)
  check_range("damping", damping, low=0.0)
  check_range("stat_decay", stat_decay, low=0.0, high=1.0, low_inclusive=True)
  if dim_order not in ("stored", "torch"):
    raise ValueError(f"dim_order must be 'stored' or 'torch', got {dim_order!r}")
  if ridge not in ("absolute", "authors"):
    raise ValueError(f"ridge must be 'absolute' or 'authors', got {ridge!r}")
  authors_ridge = ridge == "authors"

  def order_of(x) -> tuple[int, ...]:
    return _dim_permutation(x.ndim, dim_order)

  def layout_of(x) -> BlockLayout | None:
    shape = tuple(x.shape[i] for i in order_of(x))
    return block_layout(shape, operator.index(block_size))

  def init_fn(params):
    def statistics(p):
      layout = layout_of(p)
      if layout is None:
        return optax.MaskedNode()
      dtype = jnp.promote_types(p.dtype, jnp.float32)
      if authors_ridge:  # their statistics start at εI
        start = value_at(damping, jnp.zeros([], jnp.int32), dtype)
        return tuple(
          jnp.broadcast_to(start * jnp.eye(b, dtype=dtype), (layout.num_blocks, b, b))
          for b in layout.block_shape
        )
      return tuple(jnp.zeros((layout.num_blocks, b, b), dtype) for b in layout.block_shape)

    def identities(p):
      layout = layout_of(p)
      if layout is None:
        return optax.MaskedNode()
      dtype = jnp.promote_types(p.dtype, jnp.float32)
      return tuple(
        jnp.broadcast_to(jnp.eye(b, dtype=dtype), (layout.num_blocks, b, b))
        for b in layout.block_shape
      )

    if is_placeholder(params):  # optax.tree_map_params: no field is shaped like params
      return ScaleByShampooState(jnp.zeros([], jnp.int32), not_params_shaped(), not_params_shaped())
    state = ScaleByShampooState(
      count=jnp.zeros([], jnp.int32),
      statistics=jax.tree.map(statistics, params),
      inverse_roots=jax.tree.map(identities, params),
    )
    return place(params, state, shampoo_state_specs(state, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = state.count
    grads, treedef = jax.tree.flatten(updates)
    layouts = [layout_of(g) for g in grads]
    old_stats = treedef.flatten_up_to(state.statistics)
    old_roots = treedef.flatten_up_to(state.inverse_roots)

    blocks, new_stats = [], []
    for g, layout, stats in zip(grads, layouts, old_stats):
      if layout is None:
        blocks.append(None)
        new_stats.append(optax.MaskedNode())
        continue
      dtype = jnp.promote_types(g.dtype, jnp.float32)
      decay = value_at(stat_decay, count, dtype)  # β in the statistics' dtype
      weight = jnp.where(decay == 1.0, jnp.ones_like(decay), 1.0 - decay)
      b = _to_blocks(jnp.transpose(g.astype(dtype), order_of(g)), layout)
      blocks.append(b)
      new_stats.append(
        tuple((decay * s + weight * n).astype(s.dtype) for s, n in zip(stats, _block_statistics(b)))
      )

    preconditioned = [i for i, layout in enumerate(layouts) if layout is not None]
    # ε in the widest statistics' dtype; each root reads it in its own.
    widest = jnp.result_type(jnp.float32, *(grads[i].dtype for i in preconditioned))

    def refresh(stats_list):
      # Each parameter's roots on one device of a mesh, where its statistics are split.
      gamma = value_at(damping, count, widest)
      if authors_ridge:  # roots and ridges (replicated, one per block); ridges into L
        results = once_per_mesh(
          [
            lambda s, g, k=layouts[i].rank: tuple(
              zip(*(_authors_inverse_root(l, g, 2 * k) for l in s))
            )
            for i in preconditioned
          ],
          [stats_list[i] for i in preconditioned],
          (gamma,),
        )
        roots, stats = list(stats_list), list(stats_list)
        for i, (r, ridges) in zip(preconditioned, results):
          roots[i] = r
          stats[i] = tuple(
            (s + ridge[:, None, None] * jnp.eye(s.shape[-1], dtype=s.dtype)).astype(s.dtype)
            for s, ridge in zip(stats_list[i], ridges)
          )
        return roots, stats
      roots = once_per_mesh(
        [
          lambda s, g, k=layouts[i].rank: tuple(_inverse_root(l, g, 2 * k) for l in s)
          for i in preconditioned
        ],
        [stats_list[i] for i in preconditioned],
        (gamma,),
      )
      out = list(stats_list)
      for i, r in zip(preconditioned, roots):
        out[i] = r
      return out, stats_list

    def with_whole(roots):
      """The roots, and the same whole for the preconditioning: on a mesh, all of
      them in one all-gather (in each branch: a refresh step gathers only the new)."""
      gathered = iter(whole([root for i in preconditioned for root in roots[i]]))
      return roots, [
        r if layouts[i] is None else tuple(next(gathered) for _ in r) for i, r in enumerate(roots)
      ]

    if authors_ridge:  # a refresh also adds its ridges to the stored statistics

      def refreshed(stats_list):
        roots, stats_list = refresh(stats_list)
        return stats_list, with_whole(roots)

      new_stats, (new_roots, whole_roots) = jax.lax.cond(
        count % inverse_every == 0,
        refreshed,
        lambda s: (s, with_whole(old_roots)),
        new_stats,
      )
    else:
      new_roots, whole_roots = jax.lax.cond(
        count % inverse_every == 0,
        lambda s: with_whole(refresh(s)[0]),
        lambda _: with_whole(old_roots),
        new_stats,
      )

    new_updates = []
    for g, layout, b, roots in zip(grads, layouts, blocks, whole_roots):
      if layout is None:
        new_updates.append(g)
        continue
      order = order_of(g)
      direction = _from_blocks(
        _precondition_blocks(b, roots), layout, tuple(g.shape[i] for i in order)
      )
      direction = jnp.transpose(direction, tuple(order.index(i) for i in range(g.ndim)))
      new_updates.append(sgd_graft(direction, g).astype(g.dtype))

    new_state = ScaleByShampooState(
      count=optax.safe_increment(count),
      statistics=treedef.unflatten(new_stats),
      inverse_roots=treedef.unflatten(new_roots),
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: Nesterov = True,
  weight_decay: float | jax.Array = 0.0,
  block_size: int = 128,
  damping: optax.ScalarOrSchedule = 1e-6,
  inverse_every: int | jax.Array = 10,
  stat_decay: optax.ScalarOrSchedule = 1.0,
  dim_order: Literal["stored", "torch"] = "stored",
  decay_unpreconditioned_twice: bool = False,
  ridge: Literal["absolute", "authors"] = "absolute",
) -> optax.GradientTransformationExtraArgs:
  """Shampoo in front of SGD: precondition and graft → weight decay → momentum → lr.

  ``chain(scale_by_shampoo(block_size, damping, stat_decay, inverse_every),
  add_decayed_weights(weight_decay), sgd(learning_rate, momentum, nesterov))``,
  the recipe the Eva papers compare against (blocks of 128, roots every N
  steps, SGD grafting, Nesterov momentum).

  The authors' Shampoo exactly (``shampoo/shampoo.py`` of lzhangbv/eva):
  ``nesterov='authors'`` (buf ← μ²·buf + (1+μ)·d, W ← W − η·buf: their
  "Nesterov"), ``dim_order='torch'``, ``decay_unpreconditioned_twice=True``
  and ``ridge='authors'`` with ``damping=1e-12`` (their ε·λ_max ridge, added
  into the statistics, which start at εI; see the module docstring).

  Args:
    learning_rate: η, float or optax schedule.
    momentum: momentum coefficient (``None`` for none). Default 0.9.
    nesterov: ``True``, textbook Nesterov (default); ``False``, heavy ball;
      ``'authors'``, the authors' form above (:mod:`eva_optax._src.alias`).
    weight_decay: λ ≥ 0, added after preconditioning and grafting. Default 0.
    block_size, damping, inverse_every, stat_decay, dim_order, ridge: see
      :func:`scale_by_shampoo`.
    decay_unpreconditioned_twice: add λW twice to the parameters Shampoo
      does not precondition (merged rank ≤ 1: biases, norm scales, small
      kernels), d = G + 2λW there, as the authors' code does. Default False.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Gupta, Koren, Singer. Shampoo: Preconditioned Stochastic Tensor
    Optimization. ICML 2018.
  """
  preconditioner = scale_by_shampoo(
    block_size=block_size,
    damping=damping,
    stat_decay=stat_decay,
    inverse_every=inverse_every,
    dim_order=dim_order,
    ridge=ridge,
  )
  if decay_unpreconditioned_twice:
    check_range("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    check_period("block_size", block_size, static=True)

    def unpreconditioned(params):
      def passes(p):
        shape = tuple(p.shape[i] for i in _dim_permutation(p.ndim, dim_order))
        return block_layout(shape, operator.index(block_size)) is None

      return jax.tree.map(passes, params)

    preconditioner = optax.chain(
      preconditioner, optax.add_decayed_weights(weight_decay, mask=unpreconditioned)
    )
  return with_sgd(
    preconditioner,
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
  )
