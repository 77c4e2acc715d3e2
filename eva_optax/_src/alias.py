"""The SGD tail every alias of the library shares.

The authors use each preconditioner in front of SGD, in one order: precondition
→ weight decay (not preconditioned) → momentum → learning rate.
"""

from __future__ import annotations

import jax
import optax

from eva_optax._src.hyper import check_range


def with_sgd(
  preconditioner: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None,
  nesterov: bool,
  weight_decay: float | jax.Array,
) -> optax.GradientTransformationExtraArgs:
  """``chain(preconditioner, add_decayed_weights(weight_decay), sgd(learning_rate, momentum, nesterov))``."""
  check_range("learning_rate", learning_rate, low=0.0, low_inclusive=True)
  check_range("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
  check_range("weight_decay", weight_decay, low=0.0, low_inclusive=True)
  return optax.chain(
    preconditioner,
    optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
