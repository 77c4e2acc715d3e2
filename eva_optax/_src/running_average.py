"""Running averages of curvature statistics, shared by every preconditioner.

``stat_decay`` is the weight of the **old** statistics (the usual EMA meaning):

    m ← stat_decay · m + (1 − stat_decay) · new,     and m ← new at the first update.

The authors' code keeps weight 0.95 on the new value, i.e. ``stat_decay=0.05``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_running_average(
  average: jax.Array, new: jax.Array, stat_decay: float | jax.Array, count: jax.Array
) -> jax.Array:
  """One running-average step; at ``count == 0`` the average becomes ``new``."""
  new = new.astype(average.dtype)
  stat_decay = jnp.asarray(stat_decay, average.dtype)
  blended = stat_decay * average + (1.0 - stat_decay) * new
  return jnp.where(count == 0, new, blended).astype(average.dtype)
