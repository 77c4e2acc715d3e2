"""Eva-s: vectorized Shampoo (one vector per tensor dimension, Sherman–Morrison).

Symbols: G — a parameter's gradient, a tensor of rank k with dimensions
d_1 … d_k; s_i — the running sum (or average) of G's mean over every axis but
i (``dimension_means``, a vector of length d_i); u = s_1 ⊗ … ⊗ s_k; μ = Π‖s_i‖²
(= ‖u‖²); γ — damping; β — ``stat_decay``.

Shampoo keeps one statistic *matrix* L_i = Σ G_(i) G_(i)ᵀ per dimension and
applies their −1/(2k) roots. Eva-s keeps one *vector* per dimension,

    s_i ← β·s_i + w·mean_{axes ≠ i}(G),     w = 1 if β = 1 (a sum) else 1 − β,

starting from zero, and preconditions with the rank-one curvature u uᵀ + γI.
Its inverse follows from Sherman–Morrison, so no matrix is formed:

    Ĝ = G − ⟨G, u⟩ / (γ + μ) · u      (= γ (u uᵀ + γI)⁻¹ vec G),

and Ĝ is then grafted to the norm of G per tensor (:mod:`eva_optax.grafting`),
which also makes the factor 1/γ irrelevant. Eva-s needs no activations: it is a
plain gradient transformation for every parameter of rank ≥ 2 (Dense kernels,
HWIO conv kernels, stacked kernels, any tensor); parameters of rank ≤ 1 pass
through unchanged. Its state is O(Σ d_i) per parameter.

The vectors, γ and β are float32 or wider: float64 for float64 parameters
(with ``jax_enable_x64``).

The alias :func:`eva_shampoo` follows the authors' order: d = graft(Ĝ) + λW;
Nesterov momentum; W ← W − η·(μ_m·buf + d). The authors' code
(``shampoo/vshampoo.py`` of lzhangbv/eva) runs another momentum under the name
Nesterov, buf ← μ_m²·buf + (1+μ_m)·d, W ← W − η·buf: ``nesterov='authors'``
(:mod:`eva_optax._src.alias`). Their code keeps PyTorch's dimension order
(OIHW); Eva-s's update does not depend on the order of the dimensions (the
vectors are per axis and u is their outer product), so nothing is needed for it.

References:
  Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
  Second-order Optimization. arXiv:2308.02123.
  Gupta, Koren, Singer. Shampoo: Preconditioned Stochastic Tensor
  Optimization. ICML 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.alias import Nesterov, with_sgd
from eva_optax._src.hyper import check_range, value_at
from eva_optax._src.grafting import sgd_graft
from eva_optax._src.sharding import is_placeholder, not_params_shaped, replicate_on_params_mesh


def _dimension_means(grad: jax.Array) -> tuple[jax.Array, ...]:
  """``mean_{axes ≠ i}(G)`` for every axis i of ``grad``, in float32 or wider."""
  g = grad.astype(jnp.promote_types(grad.dtype, jnp.float32))
  axes = range(g.ndim)
  return tuple(jnp.mean(g, axis=tuple(j for j in axes if j != i)) for i in axes)


def sherman_morrison_tensor(
  grad: jax.Array,
  vectors: Sequence[jax.Array],
  damping: jax.Array,
  *,
  relative_damping: bool = False,
) -> jax.Array:
  """Ĝ = G − ⟨G, u⟩ / (γ + μ) · u with u = s_1 ⊗ … ⊗ s_k and μ = Π‖s_i‖².

  This is γ · (u uᵀ + γI)⁻¹ vec(G). ⟨G, u⟩ is a contraction of G with the
  vectors (one einsum); u itself appears only as a broadcast product in the
  subtraction.

  Args:
    grad: G, rank k ≥ 1.
    vectors: s_1 … s_k, ``vectors[i].shape == (grad.shape[i],)``.
    damping: γ > 0.
    relative_damping: use γ·μ in place of γ (Ĝ = G − ⟨G, û⟩ û / (1 + γ), with
      û = u/‖u‖): a fixed fraction γ/(1+γ) of G's component along u is kept,
      however large the sums s_i grow.

  Returns:
    Ĝ, with ``grad``'s shape, in float32 (or wider when ``grad`` is wider).
  """
  k = grad.ndim
  g = grad.astype(jnp.promote_types(grad.dtype, jnp.float32))
  # u = N·û with N = Π‖s_i‖ and û = ⊗ s_i/‖s_i‖, so that
  #   (⟨G, u⟩ / (γ + ‖u‖²)) u = ⟨G, û⟩ · û / (1 + γ/N²),
  # which never forms N² (it overflows float32 for gradients of size ~1e10).
  hats, ratio = [], jnp.asarray(damping, g.dtype)
  for s in vectors:
    s = s.astype(g.dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(s)))
    hats.append(s / jnp.where(norm > 0, norm, 1.0))
    if not relative_damping:
      ratio = ratio / norm / norm  # γ/N², inf when a vector is 0 (then û = 0 too)
  operands = [g, list(range(k))]
  for i, s in enumerate(hats):
    operands += [s, [i]]
  grad_dot_u = jnp.einsum(*operands, [], precision=jax.lax.Precision.HIGHEST)
  u = jnp.ones((), g.dtype)
  for i, s in enumerate(hats):
    u = u * s.reshape([-1 if j == i else 1 for j in range(k)])
  return g - (grad_dot_u / (1.0 + ratio)) * u


class ScaleByEvaShampooState(NamedTuple):
  """State of :func:`scale_by_eva_shampoo`.

  Attributes:
    count: number of updates so far (int32).
    dimension_means: per parameter, a tuple of the vectors s_1 … s_k (float32
      or wider, one per dimension) for parameters of rank ≥ 2, and ``optax.MaskedNode()``
      for parameters of rank ≤ 1 (they keep no state). Fixed at ``init``.
  """

  count: jax.Array
  dimension_means: Any


def _is_preconditioned(x) -> bool:
  return x.ndim >= 2 and x.size > 0


def scale_by_eva_shampoo(
  *,
  damping: optax.ScalarOrSchedule = 0.03,
  stat_decay: optax.ScalarOrSchedule = 1.0,
  relative_damping: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Eva-s's preconditioner with SGD grafting (no learning rate, no sign).

  For every parameter of rank k ≥ 2:

      s_i ← β·s_i + w·mean_{axes ≠ i}(G)   (w = 1 if β = 1 else 1 − β; s_i = 0 at init),
      Ĝ = G − ⟨G, s_1 ⊗ … ⊗ s_k⟩ / (γ + Π‖s_i‖²) · s_1 ⊗ … ⊗ s_k,
      update = Ĝ · ‖G‖ / ‖Ĝ‖                (0 when Ĝ = 0).

  The vectors include the current gradient. Parameters of rank ≤ 1 (biases,
  norm scales, scalars) are returned unchanged.

  Args:
    damping: γ > 0, float or optax schedule. Default 0.03.
    stat_decay: β ∈ [0, 1], the weight of the **old** vectors. Default 1.0:
      the vectors are sums over all steps, as in the authors' runs. With
      β < 1 they are exponential averages with weight 1 − β on the new means,
      starting from zero (no first-step special case).
    relative_damping: damp with γ·Π‖s_i‖² instead of γ. Default False (the
      authors' rule).

  With the authors' rule, once the sums grow (Π‖s_i‖² ≫ γ), Ĝ is G with its
  component along u projected out, and grafting rescales what is left to
  ‖G‖. Where the gradient keeps the direction of u, as on a quadratic bowl
  ‖X − T‖² (every gradient is a multiple of X − T, and so are the sums), what
  is left is rounding noise, and Eva-s stalls far from T where SGD and Shampoo
  converge. ``relative_damping=True`` keeps the fraction γ/(1+γ) of that
  component at every scale, so the grafted direction stays a descent
  direction, and Eva-s converges there. On networks it is not free: on the
  Fashion-MNIST autoencoder (3 epochs, lr 0.6, one seed) the final training
  loss is 0.0380 with the authors' rule, 0.0383 with relative γ = 1e-3 and
  0.0413 with relative γ = 0.03; hence a smaller γ with this option, and the
  authors' rule as the default.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs no
    ``stats`` and ignores extra arguments.

  References:
    Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
    Second-order Optimization. arXiv:2308.02123.
  """
  check_range("damping", damping, low=0.0)
  check_range("stat_decay", stat_decay, low=0.0, high=1.0, low_inclusive=True)

  def init_fn(params):
    def vectors(p):
      if not _is_preconditioned(p):
        return optax.MaskedNode()
      dtype = jnp.promote_types(p.dtype, jnp.float32)
      return tuple(jnp.zeros((d,), dtype) for d in p.shape)

    if is_placeholder(params):  # optax.tree_map_params: no field is shaped like params
      return ScaleByEvaShampooState(jnp.zeros([], jnp.int32), not_params_shaped())
    return replicate_on_params_mesh(
      params,
      ScaleByEvaShampooState(
        count=jnp.zeros([], jnp.int32),
        dimension_means=jax.tree.map(vectors, params),
      ),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = state.count
    grads, treedef = jax.tree.flatten(updates)
    old_vectors = treedef.flatten_up_to(state.dimension_means)
    new_updates, new_vectors = [], []
    for g, vectors in zip(grads, old_vectors):
      if not _is_preconditioned(g):
        new_updates.append(g)
        new_vectors.append(optax.MaskedNode())
        continue
      # γ and β in the vectors' dtype (float64 for float64 parameters).
      dtype = jnp.promote_types(g.dtype, jnp.float32)
      gamma = value_at(damping, count, dtype)
      decay = value_at(stat_decay, count, dtype)
      weight = jnp.where(decay == 1.0, jnp.ones_like(decay), 1.0 - decay)
      vectors = tuple(
        (decay * s + weight * m).astype(s.dtype) for s, m in zip(vectors, _dimension_means(g))
      )
      direction = sherman_morrison_tensor(g, vectors, gamma, relative_damping=relative_damping)
      new_updates.append(sgd_graft(direction, g).astype(g.dtype))
      new_vectors.append(vectors)

    new_state = ScaleByEvaShampooState(
      count=optax.safe_increment(count),
      dimension_means=treedef.unflatten(new_vectors),
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def eva_shampoo(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: Nesterov = True,
  weight_decay: float | jax.Array = 0.0,
  damping: optax.ScalarOrSchedule = 0.03,
  stat_decay: optax.ScalarOrSchedule = 1.0,
  relative_damping: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Eva-s in front of SGD: precondition and graft → weight decay → momentum → lr.

  ``chain(scale_by_eva_shampoo(damping, stat_decay),
  add_decayed_weights(weight_decay), sgd(learning_rate, momentum, nesterov))``:
  d = graft(Ĝ) + λW (weight decay neither preconditioned nor grafted), then
  (Nesterov) momentum and the learning rate. See :func:`scale_by_eva_shampoo`.

  Args:
    learning_rate: η, float or optax schedule.
    momentum: momentum coefficient (``None`` for none). Default 0.9.
    nesterov: ``True``, textbook Nesterov (default); ``False``, heavy ball;
      ``'authors'``, what the authors' runs did under the name Nesterov:
      buf ← μ²·buf + (1+μ)·d, W ← W − η·buf (``shampoo/vshampoo.py``; see
      :mod:`eva_optax._src.alias`).
    weight_decay: λ ≥ 0, added after preconditioning and grafting. Default 0.
    damping, stat_decay, relative_damping: see :func:`scale_by_eva_shampoo`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; no ``stats`` needed::

      tx = eva_optax.eva_shampoo(0.1, weight_decay=5e-4)
      updates, opt_state = tx.update(grads, opt_state, params)

  References:
    Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
    Second-order Optimization. arXiv:2308.02123.
  """
  return with_sgd(
    scale_by_eva_shampoo(damping=damping, stat_decay=stat_decay, relative_damping=relative_damping),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
  )
