"""Grafting: the direction of one optimizer with the step size of another.

A preconditioner fixes a good *direction* D for a parameter but often a poor
*scale*: Shampoo's −1/(2k) roots and Eva-s's projection change the norm of the
gradient in ways that a learning rate tuned for SGD does not expect. Grafting
keeps the direction and borrows the norm from a reference update R (here the
plain gradient, i.e. "SGD grafting"), per tensor:

    graft(D, R) = D · ‖R‖_F / ‖D‖_F,      and 0 when D = 0,

so the grafted update has exactly the Frobenius norm of R, and an SGD learning
rate schedule carries over unchanged.

References:
  Agarwal, Anil, Hazan, Koren, Zhang. Disentangling Adaptive Gradient Methods
  from Learning Rates. arXiv:2002.11803, 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def frobenius_norm(x: jax.Array) -> jax.Array:
  """‖x‖_F over all axes, accumulated in at least float32 (finite gradient at 0)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  square = jnp.sum(jnp.square(x.astype(dtype)))
  positive = square > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, square, 1.0)), 0.0)


def graft_to_norm(direction: jax.Array, reference: jax.Array) -> jax.Array:
  """``direction`` rescaled to the Frobenius norm of ``reference`` (one tensor).

      direction · ‖reference‖_F / ‖direction‖_F,   and 0 when direction = 0.

  Args:
    direction: the update whose direction is kept (any shape).
    reference: the update whose norm is borrowed (any shape; usually the same).

  Returns:
    An array of ``direction``'s shape and dtype. Apply it to whole trees with
    ``jax.tree.map(graft_to_norm, directions, references)``.
  """
  direction_norm = frobenius_norm(direction)
  positive = direction_norm > 0
  safe_norm = jnp.where(positive, direction_norm, 1.0)
  scale = jnp.where(positive, frobenius_norm(reference) / safe_norm, 0.0)
  return (direction * scale).astype(direction.dtype)


def sgd_graft(direction: jax.Array, grad: jax.Array) -> jax.Array:
  """SGD grafting: ``direction`` with the norm of the plain gradient, per tensor.

  ``graft_to_norm(direction, grad)``: the magnitude SGD would take on this
  tensor, in the preconditioner's direction (Shampoo's and Eva-s's grafting).
  """
  return graft_to_norm(direction, grad)
