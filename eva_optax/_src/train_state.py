"""A Flax Linen ``TrainState`` whose ``apply_gradients`` forwards the statistics.

``flax.training.train_state.TrainState.apply_gradients`` calls
``tx.update(grads, opt_state, params)`` and has no way to pass ``stats=``; this
subclass takes them as one more keyword and forwards them (and nothing else
changes: ``step``, ``params``, ``opt_state`` and the extra fields behave as in
Flax's). Usage::

    state = eva_optax.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=eva_optax.eva(0.01))
    loss, grads, stats = grad_fn(state.params, x, y)
    state = state.apply_gradients(grads=grads, stats=stats)
"""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """:class:`flax.training.train_state.TrainState` with ``apply_gradients(grads=, stats=)``."""

  def apply_gradients(self, *, grads: Any, stats: Any = None, **kwargs: Any) -> TrainState:
    """One step: ``tx.update(grads, opt_state, params, stats=stats)``, then apply.

    Args:
      grads: gradients shaped like ``params``.
      stats: the statistics of :func:`eva_optax.value_and_grad` for the
        optimizers that need them; ``None`` (the default) passes none, for
        gradient-only transformations (Eva-s, Shampoo, optax's own).
      **kwargs: other fields to ``replace``, as in Flax.

    Returns:
      The updated state, ``step`` incremented by one.
    """
    extra = {} if stats is None else {"stats": stats}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **kwargs,
    )
