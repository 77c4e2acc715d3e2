"""Small dense linear algebra shared by the matrix-based baselines (K-FAC, FOOF)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spd_inverse(matrix: jax.Array) -> jax.Array:
  """Inverse of a (batch of) symmetric positive definite matrices, by Cholesky.

  ``L = chol(M)``, ``M⁻¹ = L⁻ᵀ L⁻¹``; float32; leading axes are a batch.
  """
  matrix = matrix.astype(jnp.float32)
  lower = jnp.linalg.cholesky(matrix)
  eye = jnp.broadcast_to(jnp.eye(matrix.shape[-1], dtype=matrix.dtype), matrix.shape)
  lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
  return jnp.einsum("...ki,...kj->...ij", lower_inv, lower_inv)


def add_to_diagonal(matrix: jax.Array, value: jax.Array) -> jax.Array:
  """``M + value·I`` for a (batch of) square matrices; ``value`` broadcasts over the batch."""
  eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  return matrix + jnp.asarray(value, matrix.dtype)[..., None, None] * eye


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
