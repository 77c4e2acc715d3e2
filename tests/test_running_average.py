"""Running averages (``eva_optax._src.running_average``) against their formula.

m ← stat_decay · m + (1 − stat_decay) · new, and m ← new at the first update.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src.running_average import update_running_average


def test_running_average_first_update_takes_new_value():
  old, new = jnp.array([5.0, -5.0]), jnp.array([1.0, 2.0])
  np.testing.assert_allclose(update_running_average(old, new, 0.3, jnp.int32(0)), new)
  np.testing.assert_allclose(
    update_running_average(old, new, 0.3, jnp.int32(1)), 0.3 * old + 0.7 * new, rtol=1e-6
  )


@pytest.mark.parametrize("stat_decay", [0.0, 0.05, 0.9])
def test_steps_equal_the_recursion_by_hand(stat_decay):
  """Five steps from a zero average: m₀ = x₀, then mₜ = β mₜ₋₁ + (1 − β) xₜ."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(5, 3, 2))
  average = jnp.zeros((3, 2), jnp.float32)
  want = None
  for count, x in enumerate(xs):
    average = update_running_average(
      average, jnp.asarray(x, jnp.float32), stat_decay, jnp.int32(count)
    )
    want = x if count == 0 else stat_decay * want + (1.0 - stat_decay) * x
    np.testing.assert_allclose(average, want, rtol=1e-5, atol=1e-6)


def test_keeps_the_dtype_of_the_average():
  """A bfloat16 statistic enters a float32 average as float32."""
  old = jnp.full((4,), 2.0, jnp.float32)
  new = jnp.asarray([1.0, 3.0, -1.0, 0.5], jnp.bfloat16)
  got = update_running_average(old, new, 0.25, jnp.int32(3))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, 0.25 * 2.0 + 0.75 * np.asarray(new, np.float32), rtol=1e-6)
