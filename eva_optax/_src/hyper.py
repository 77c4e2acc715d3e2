"""Hyperparameters that may be numbers, arrays or optax schedules.

Every rule in the library reads its hyperparameters through :func:`value_at`, so
a float, a traced array (``optax.inject_hyperparams``) and a schedule
``count -> value`` are accepted alike, and validates concrete values once, at
construction, through :func:`check_range`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def value_at(
  hyper: optax.ScalarOrSchedule, count: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
  """The value of ``hyper`` at step ``count`` (a schedule is called, else kept),
  in ``dtype`` (float32, or float64 for the rules of float64 layers)."""
  if callable(hyper):
    return jnp.asarray(hyper(count), dtype=dtype)
  return jnp.asarray(hyper, dtype=dtype)


def check_range(
  name: str,
  hyper: optax.ScalarOrSchedule | None,
  *,
  low: float | None = None,
  high: float | None = None,
  low_inclusive: bool = False,
  high_inclusive: bool = True,
) -> None:
  """Raises ``ValueError`` naming ``name`` when a concrete ``hyper`` is out of range.

  Schedules and traced values cannot be checked before they are used and are let
  through; ``None`` is let through too (callers decide whether it is allowed).
  A value of the wrong type (a string such as ``'0.1'``, a bool) is a
  ``ValueError`` naming ``name``.
  """
  if hyper is None or callable(hyper) or isinstance(hyper, jax.core.Tracer):
    return
  value = np.asarray(hyper)
  if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
    # a string, a bool, a complex number, an object
    raise ValueError(f"{name} must be a number, an array or a schedule, got {hyper!r}")
  if value.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
  value = float(value)
  bad = not np.isfinite(value)
  if low is not None:
    bad |= value < low if low_inclusive else value <= low
  if high is not None:
    bad |= value > high if high_inclusive else value >= high
  if bad:
    lo = "" if low is None else ("[" if low_inclusive else "(") + f"{low}"
    hi = "" if high is None else f"{high}" + ("]" if high_inclusive else ")")
    raise ValueError(f"{name} must be finite and in {lo or '(-inf'}, {hi or 'inf)'}; got {value}")


def check_period(name: str, value: Any, *, static: bool = False) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is an integer ≥ 1.

  Periods (``stats_every``, ``inverse_every``) may be traced, e.g. under
  ``optax.inject_hyperparams``, and are then let through; a parameter that fixes
  array shapes (``static``, e.g. Shampoo's ``block_size``) must be a Python
  integer, and a traced one is refused with the ``static_args`` hint.
  """
  if isinstance(value, jax.core.Tracer):
    if static:
      raise ValueError(
        f"{name} fixes array shapes and must be a Python int, not a traced value;"
        f" with optax.inject_hyperparams pass static_args=('{name}',)"
      )
    return
  array = np.asarray(value)
  if (
    isinstance(value, bool)
    or array.shape != ()
    or not np.issubdtype(array.dtype, np.integer)
    or array < 1
  ):
    raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
