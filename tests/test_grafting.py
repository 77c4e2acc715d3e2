"""Grafting (``eva_optax._src.grafting``): the direction of one update, the norm of another.

graft(D, R) = D · ‖R‖_F / ‖D‖_F, and 0 when D = 0; SGD grafting takes R = the gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src import grafting


def test_graft_to_norm_and_zero_direction():
  d = jnp.array([[3.0, 4.0]])
  r = jnp.array([[0.0, 10.0]])
  np.testing.assert_allclose(grafting.graft_to_norm(d, r), [[6.0, 8.0]], rtol=1e-6)
  np.testing.assert_array_equal(grafting.graft_to_norm(jnp.zeros((2, 2)), r), jnp.zeros((2, 2)))
  assert np.isfinite(
    np.asarray(jax.grad(lambda x: grafting.graft_to_norm(x, r).sum())(jnp.zeros((1, 2))))
  ).all()


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 3, 2, 4)])
def test_frobenius_norm_equals_numpy(shape):
  x = np.random.default_rng(0).normal(size=shape)
  got = grafting.frobenius_norm(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(float(got), np.linalg.norm(x.reshape(-1)), rtol=1e-6)
  assert float(grafting.frobenius_norm(jnp.zeros(shape))) == 0.0


def test_sgd_graft_has_the_gradients_norm_and_the_directions_direction():
  rng = np.random.default_rng(1)
  direction = rng.normal(size=(6, 3))
  grad = 40.0 * rng.normal(size=(6, 3))
  got = np.asarray(
    grafting.sgd_graft(jnp.asarray(direction, jnp.float32), jnp.asarray(grad, jnp.float32))
  )
  np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(grad), rtol=1e-5)
  np.testing.assert_allclose(
    got, direction * np.linalg.norm(grad) / np.linalg.norm(direction), rtol=1e-5
  )


def test_graft_keeps_the_directions_dtype():
  direction = jnp.asarray([[1.0, -2.0], [2.0, 4.0]], jnp.bfloat16)  # ‖D‖ = 5
  reference = jnp.asarray([[0.0, 10.0]], jnp.float32)  # ‖R‖ = 10, another shape
  got = grafting.graft_to_norm(direction, reference)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 2)
  np.testing.assert_allclose(
    np.asarray(got, np.float32), 2.0 * np.asarray(direction, np.float32), rtol=1e-2
  )
