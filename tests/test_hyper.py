"""Hyperparameters (``eva_optax._src.hyper``): range and period checks by name, values at a step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src.hyper import check_period, check_range, value_at

# (value, bounds, accepted): the bounds of check_range, open or closed at each end.
RANGE_CASES = [
  (0.5, dict(low=0.0, high=1.0), True),
  (1.0, dict(low=0.0, high=1.0), True),  # high is inclusive by default
  (0.0, dict(low=0.0, high=1.0), False),  # low is exclusive by default
  (0.0, dict(low=0.0, low_inclusive=True), True),
  (1.0, dict(low=0.0, high=1.0, high_inclusive=False), False),
  (-1e-3, dict(low=0.0, low_inclusive=True), False),
  (1e30, dict(low=0.0), True),
  (float("nan"), dict(), False),
  (float("inf"), dict(low=0.0), False),
  (np.float32(0.3), dict(low=0.0, high=1.0), True),
  (jnp.asarray(2.0), dict(low=0.0, high=1.0), False),
]


@pytest.mark.parametrize("value, bounds, accepted", RANGE_CASES)
def test_check_range_accepts_or_refuses_by_name(value, bounds, accepted):
  if accepted:
    check_range("stat_decay", value, **bounds)
  else:
    with pytest.raises(ValueError, match="stat_decay must be finite and in"):
      check_range("stat_decay", value, **bounds)


def test_check_range_message_gives_the_interval():
  with pytest.raises(ValueError, match=r"momentum must be finite and in \[0.0, 1.0\); got 1.0"):
    check_range("momentum", 1.0, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
  with pytest.raises(ValueError, match=r"damping must be finite and in \(0.0, inf\); got -2.0"):
    check_range("damping", -2.0, low=0.0)


def test_check_range_refuses_non_scalars_by_name():
  with pytest.raises(ValueError, match="kl_clip must be a scalar"):
    check_range("kl_clip", np.ones(2), low=0.0)


@pytest.mark.parametrize("value", ["0.1", b"0.1", True, np.bool_(False), np.asarray("x")])
def test_check_range_refuses_strings_and_bools_by_name(value):
  with pytest.raises(ValueError, match="learning_rate must be a number, an array or a schedule"):
    check_range("learning_rate", value, low=0.0, low_inclusive=True)


def test_check_range_lets_through_what_it_cannot_check():
  """None, schedules and traced values are checked where they are used."""
  check_range("damping", None, low=0.0)
  check_range("damping", optax.constant_schedule(-1.0), low=0.0)
  jax.make_jaxpr(lambda d: check_range("damping", d, low=0.0) or d)(-1.0)


@pytest.mark.parametrize("value", [1, 3, np.int32(2), np.asarray(7)])
def test_check_period_accepts_integers_from_one(value):
  check_period("inverse_every", value)
  check_period("block_size", value, static=True)


@pytest.mark.parametrize("value", [0, -1, 2.5, 1.0, True, np.ones(2, int), "3"])
def test_check_period_refuses_by_name(value):
  with pytest.raises(ValueError, match="stats_every must be an integer ≥ 1"):
    check_period("stats_every", value)


def test_check_period_traced_passes_unless_it_fixes_shapes():
  jax.make_jaxpr(lambda n: check_period("inverse_every", n) or n)(3)
  with pytest.raises(
    ValueError, match=r"block_size fixes array shapes.*static_args=\('block_size',\)"
  ):
    jax.make_jaxpr(lambda n: check_period("block_size", n, static=True) or n)(3)


def test_value_at_a_number_and_a_schedule():
  got = value_at(0.25, jnp.int32(7))
  assert got.dtype == jnp.float32 and float(got) == 0.25
  schedule = optax.linear_schedule(1.0, 0.0, transition_steps=10)
  for count, want in [(0, 1.0), (5, 0.5), (10, 0.0), (20, 0.0)]:
    got = value_at(schedule, jnp.int32(count))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, atol=1e-7)
  decay = optax.exponential_decay(0.1, 1, 0.5)
  np.testing.assert_allclose(float(value_at(decay, jnp.int32(3))), 0.1 * 0.5**3, rtol=1e-6)


def test_value_at_in_float64_keeps_the_decimal():
  # Shampoo and Eva-s read γ and β in the parameters' dtype: 0.03 in float32
  # is 0.029999999329…, 2e-8 off, the whole of Eva-s's former float64 error.
  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:
    got = value_at(0.03, jnp.int32(0), jnp.float64)
    assert got.dtype == jnp.float64 and float(got) == 0.03
    got = value_at(lambda count: 0.03 * (count + 1), jnp.int32(1), jnp.float64)
    assert got.dtype == jnp.float64 and float(got) == 0.06
  finally:
    jax.config.update("jax_enable_x64", before)
  assert float(value_at(0.03, jnp.int32(0))) != 0.03
