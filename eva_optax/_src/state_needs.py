"""What an optimizer state asks of the capture: which statistics, and whether a factor gate.

A training step written once for any optimizer (several trained side by side, or one
picked by a flag) reads these from the state it is given instead of being told which
optimizer it runs: :func:`statistics_needed` (``()``: a plain gradient is enough) and
:func:`has_factor_gate` (pass ``factors_due=eva_optax.factors_due(opt_state)`` to the
capture). Both read only the state's structure (its NamedTuple fields and types), so
they work on a concrete, traced (inside ``jit``) or abstract (``jax.eval_shape``) state.
"""

from __future__ import annotations

from typing import Any

import jax

from eva_optax._src.layerwise_specs import is_layerwise_state
from eva_optax._src.preconditioning import FactorGate
from eva_optax._src.statistics import STATISTICS


def _averages_statistics(node: Any) -> bool:
  """The state of a layer-wise transformation (its fields: ``count``, a statistic each, …)."""
  return is_layerwise_state(node)


def statistics_needed(opt_state: Any) -> tuple[str, ...]:
  """The statistics the layer-wise optimizers inside ``opt_state`` average.

  Every state of :func:`eva_optax.scale_by_eva`, :func:`eva_optax.scale_by_eva_foof`,
  :func:`eva_optax.scale_by_kfac` and :func:`eva_optax.scale_by_foof` keeps one field
  per statistic it averages, named after it (``input_mean`` ā, ``output_grad_mean`` ḡ,
  ``input_factor`` A, ``output_grad_factor`` G). This finds those states wherever they
  sit (``optax.chain``, ``partition``, ``inject_hyperparams``, ``MultiSteps``, …) and
  returns the union of their fields, in the order of ``eva_optax``'s statistics; ``()``
  when there is none (SGD, AdamW, Shampoo, Eva-s), whose update needs no ``stats``::

      needed = eva_optax.statistics_needed(opt_state)
      if needed:
        grad_fn = eva_optax.value_and_grad(loss_fn, statistics=needed)
        gate = eva_optax.has_factor_gate(opt_state)
        due = {"factors_due": eva_optax.factors_due(opt_state)} if gate else {}
        loss, grads, stats = grad_fn(params, batch, **due)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      else:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)

  Args:
    opt_state: the state of any optax transformation (concrete, traced or abstract).

  Returns:
    The names to pass as ``statistics=`` to :func:`eva_optax.value_and_grad` or
    :func:`eva_optax.nnx_value_and_grad`.
  """
  found: set[str] = set()
  for node in jax.tree.leaves(opt_state, is_leaf=_averages_statistics):
    if _averages_statistics(node):
      found.update(f for f in node._fields if f in STATISTICS)
  return tuple(name for name in STATISTICS if name in found)


def has_factor_gate(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds a :class:`~eva_optax.FactorGate` (K-FAC, FOOF).

  Where it does, :func:`eva_optax.factors_due` of the state tells the capture on which
  steps to compute the factors A and G (``stats_every``); where it does not,
  ``factors_due`` raises, and the capture computes whatever it is asked for.

  Args:
    opt_state: the state of any optax transformation (concrete, traced or abstract).
  """
  is_gate = lambda node: isinstance(node, FactorGate)  # noqa: E731
  return any(is_gate(node) for node in jax.tree.leaves(opt_state, is_leaf=is_gate))


__all__ = ["has_factor_gate", "statistics_needed"]
