"""The SGD tail every alias of the library shares.

The authors use each preconditioner in front of SGD, in one order: precondition
→ weight decay (not preconditioned) → momentum → learning rate.

Momentum comes in three forms (``nesterov``), with d the update after weight
decay, μ the momentum and η the learning rate:

* ``False``, heavy ball: buf ← μ·buf + d;  W ← W − η·buf.
* ``True``, textbook Nesterov (optax's): buf ← μ·buf + d;
  W ← W − η·(μ·buf + d).
* ``'authors'``, what the authors' Shampoo and Eva-s code runs with its
  ``nesterov=True`` (``shampoo/shampoo.py`` and ``shampoo/vshampoo.py`` of
  lzhangbv/eva, the momentum step): the Nesterov look-ahead is added to the
  momentum buffer itself, in place, so the stored buffer is updated twice:
  buf ← μ·(μ·buf + d) + d = μ²·buf + (1 + μ)·d;  W ← W − η·buf.
  That is heavy-ball momentum μ² at the rate η(1 + μ), not Nesterov: the
  first step equals Nesterov's, later steps differ (a gradient's total weight
  is (1 + μ)/(1 − μ²) = 1/(1 − μ), as for heavy ball μ).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.hyper import check_range

Nesterov = bool | Literal["authors"]
"""``nesterov`` of every alias: ``False``, ``True`` (textbook) or ``'authors'``."""


def check_nesterov(nesterov: Any) -> None:
  """Raises ``ValueError`` unless ``nesterov`` is ``True``, ``False`` or ``'authors'``."""
  if not (isinstance(nesterov, bool) or (isinstance(nesterov, str) and nesterov == "authors")):
    raise ValueError(
      "nesterov must be True (textbook Nesterov), False (heavy ball) or 'authors'"
      f" (the authors' Shampoo and Eva-s momentum, buf ← μ²·buf + (1+μ)·d), got {nesterov!r}"
    )


def authors_momentum(momentum: float | jax.Array) -> optax.GradientTransformation:
  """The authors' "Nesterov" momentum: buf ← μ·(μ·buf + d) + d, returns buf.

  = μ²·buf + (1 + μ)·d, computed in their order (two in-place updates of the
  buffer, ``shampoo/shampoo.py`` and ``shampoo/vshampoo.py`` of lzhangbv/eva).
  Its state is an ``optax.TraceState`` (the buffer, zero at init), like
  ``optax.trace``'s, so that a checkpoint of either has the same structure.

  Args:
    momentum: μ ∈ [0, 1).

  Returns:
    An ``optax.GradientTransformation``; follow it with the learning rate.
  """
  check_range("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)

  def init_fn(params):
    return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params

    def step(d, buf):
      mu = jnp.asarray(momentum, buf.dtype)
      buf = mu * buf + d
      return (mu * buf + d).astype(buf.dtype)

    new = jax.tree.map(step, updates, state.trace)
    return new, optax.TraceState(trace=new)

  return optax.GradientTransformation(init_fn, update_fn)


def with_sgd(
  preconditioner: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None,
  nesterov: Nesterov,
  weight_decay: float | jax.Array,
) -> optax.GradientTransformationExtraArgs:
  """``chain(preconditioner, add_decayed_weights(weight_decay), sgd(learning_rate, momentum, nesterov))``.

  With ``nesterov='authors'`` the momentum is :func:`authors_momentum`
  (buf ← μ²·buf + (1+μ)·d, W ← W − η·buf) in place of optax's ``trace``; the
  state has the same structure. See the module docstring for the three forms.
  """
  check_range("learning_rate", learning_rate, low=0.0, low_inclusive=True)
  check_range("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
  check_range("weight_decay", weight_decay, low=0.0, low_inclusive=True)
  check_nesterov(nesterov)
  if nesterov == "authors" and momentum is not None:
    tail = optax.chain(authors_momentum(momentum), optax.scale_by_learning_rate(learning_rate))
  else:
    tail = optax.sgd(learning_rate, momentum=momentum, nesterov=bool(nesterov))
  return optax.chain(preconditioner, optax.add_decayed_weights(weight_decay), tail)
