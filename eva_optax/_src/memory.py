"""Optimizer-state size, for comparing optimizers on the same parameters."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
  """Bytes of ``tx.init(params)``, from shapes only (nothing is allocated).

  Works for every optimizer of the library and any optax transformation;
  ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves.
  """
  state = jax.eval_shape(tx.init, params)
  return int(
    sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))
  )
