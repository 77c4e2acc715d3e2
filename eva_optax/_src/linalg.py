"""Small dense linear algebra shared by the matrix-based baselines (K-FAC, FOOF, Shampoo).

Batched decompositions go through :func:`per_matrix`: on the CPU backend a
batched LAPACK call (``cholesky``, ``eigh`` on a ``(b, n, n)`` array) that runs
next to other such calls in one program can deadlock XLA's CPU thread pool
(jax/jaxlib 0.10.2: the step never returns, no CPU used), so there the batch
is walked one matrix at a time with ``lax.map``; other backends keep the
batched call.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp


def per_matrix(fn: Callable[[jax.Array], Any], matrices: jax.Array) -> Any:
  """``fn`` applied to a ``(..., n, n)`` batch: batched, or one matrix at a time on CPU.

  ``fn`` maps ``(n, n)`` to a pytree of arrays and must also accept a batch
  ``(b, n, n)`` (as ``jnp.linalg`` functions do). The result has the batch
  axes of ``matrices`` in front.
  """
  batch = matrices.shape[:-2]
  if not batch:
    return fn(matrices)
  flat = matrices.reshape((-1,) + matrices.shape[-2:])

  def restore(tree):
    return jax.tree.map(lambda x: x.reshape(batch + x.shape[1:]), tree)

  return jax.lax.platform_dependent(
    flat,
    cpu=lambda m: restore(jax.lax.map(fn, m)),
    default=lambda m: restore(fn(m)),
  )


def spd_inverse(matrix: jax.Array) -> jax.Array:
  """Inverse of a (batch of) symmetric positive definite matrices, by Cholesky.

  ``L = chol(M)``, ``M⁻¹ = L⁻ᵀ L⁻¹``; in float32 or wider (float64 stays);
  leading axes are a batch.
  """

  def inverse(m):
    lower = jnp.linalg.cholesky(m)
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    return jnp.einsum("...ki,...kj->...ij", lower_inv, lower_inv)

  return per_matrix(inverse, matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32)))


def add_to_diagonal(matrix: jax.Array, value: jax.Array) -> jax.Array:
  """``M + value·I`` for a (batch of) square matrices; ``value`` broadcasts over the batch."""
  eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  return matrix + jnp.asarray(value, matrix.dtype)[..., None, None] * eye


#: The smallest damping relative to tr(M)/dim(M) that :func:`damped_inverse`
#: applies: below it, M + λI is singular in float32 and Cholesky gives NaN.
_RELATIVE_DAMPING_FLOOR = 1e-6


def damped_inverse(matrix: jax.Array, damping: jax.Array) -> jax.Array:
  """(M + λ'I)⁻¹ with λ' = max(λ, 1e-6 · tr(M)/dim(M)), per matrix of a batch.

  The floor matters only when λ is negligible next to M's scale in float32
  (e.g. a factor G of gradients of size 1e15 with π-damping); there the
  result is finite instead of NaN, and otherwise it is exactly (M + λI)⁻¹.
  """
  matrix = matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32))
  floor = _RELATIVE_DAMPING_FLOOR * mean_trace(matrix)
  return spd_inverse(
    add_to_diagonal(matrix, jnp.maximum(jnp.asarray(damping, matrix.dtype), floor))
  )


def block_sizes(n: int, blocks: int) -> list[int]:
  """Sizes of ``min(blocks, n)`` contiguous diagonal blocks of an ``n × n``
  matrix, as equal as can be, the larger ones first."""
  sections = min(blocks, n)
  each, extra = divmod(n, sections)
  return [each + 1] * extra + [each] * (sections - extra)


def block_diagonal_damped_inverse(matrix: jax.Array, damping: jax.Array, blocks: int) -> jax.Array:
  """The inverse of the block-diagonal part of ``M + λI``: :func:`damped_inverse`
  of each of ``blocks`` diagonal blocks (:func:`block_sizes`), zeros elsewhere.

  ``blocks = 1`` is :func:`damped_inverse` itself. The authors' K-FAC inverts
  its factors so, in 4 blocks, to bound the cost of large factors.
  """
  if blocks <= 1 or matrix.shape[-1] <= 1:
    return damped_inverse(matrix, damping)
  out = jnp.zeros(matrix.shape, jnp.promote_types(matrix.dtype, jnp.float32))
  start = 0
  for size in block_sizes(matrix.shape[-1], blocks):
    end = start + size
    block = damped_inverse(matrix[..., start:end, start:end], damping)
    out = out.at[..., start:end, start:end].set(block)
    start = end
  return out


def mean_trace(matrix: jax.Array) -> jax.Array:
  """tr(M) / dim(M), per matrix of a batch."""
  return jnp.trace(matrix, axis1=-2, axis2=-1) / matrix.shape[-1]


def with_bias_row(kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """``[K; b]``: the ``stack + (in, out)`` kernel matrix with the bias as last row."""
  if bias is None:
    return kernel
  return jnp.concatenate([kernel, bias[..., None, :]], axis=-2)


def split_bias_row(matrix: jax.Array, has_bias: bool) -> tuple[jax.Array, jax.Array | None]:
  """Inverse of :func:`with_bias_row`."""
  if not has_bias:
    return matrix, None
  return matrix[..., :-1, :], matrix[..., -1, :]
