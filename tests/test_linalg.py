"""Small dense linear algebra (``eva_optax._src.linalg``) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

from eva_optax._src import linalg
from models import spd

jax.config.update("jax_default_matmul_precision", "highest")


def test_spd_inverse_batched():
  rng = np.random.default_rng(3)
  m = np.stack([spd(rng, 5) + 0.1 * np.eye(5) for _ in range(3)])
  np.testing.assert_allclose(
    linalg.spd_inverse(jnp.asarray(m, jnp.float32)), np.linalg.inv(m), rtol=1e-3, atol=1e-3
  )


def test_damped_inverse_is_the_inverse_of_m_plus_damping():
  """(M + λI)⁻¹ for a batch with one λ each; the relative floor only under a negligible λ."""
  rng = np.random.default_rng(4)
  m = np.stack([spd(rng, 4), spd(rng, 4, scale=10.0)])
  damping = np.array([0.1, 0.5])
  got = linalg.damped_inverse(jnp.asarray(m, jnp.float32), jnp.asarray(damping, jnp.float32))
  want = np.linalg.inv(m + damping[:, None, None] * np.eye(4))
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  # A singular M and λ = 0: the floor 1e-6 · tr(M)/dim(M) keeps the result finite.
  singular = np.outer(np.arange(1.0, 4.0), np.arange(1.0, 4.0))
  floored = np.asarray(linalg.damped_inverse(jnp.asarray(singular, jnp.float32), 0.0))
  assert np.all(np.isfinite(floored))


def test_add_to_diagonal_and_mean_trace():
  m = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
  got = linalg.add_to_diagonal(jnp.asarray(m), jnp.asarray([1.0, -2.0]))
  np.testing.assert_array_equal(got, m + np.array([1.0, -2.0])[:, None, None] * np.eye(3))
  np.testing.assert_allclose(linalg.mean_trace(jnp.asarray(m)), np.trace(m, axis1=1, axis2=2) / 3)


def test_bias_row_round_trip():
  kernel, bias = np.ones((2, 4, 3), np.float32), np.full((2, 3), 5.0, np.float32)
  full = linalg.with_bias_row(jnp.asarray(kernel), jnp.asarray(bias))
  assert full.shape == (2, 5, 3)
  np.testing.assert_array_equal(full[:, -1], bias)
  k, b = linalg.split_bias_row(full, True)
  np.testing.assert_array_equal(k, kernel)
  np.testing.assert_array_equal(b, bias)
  np.testing.assert_array_equal(linalg.with_bias_row(jnp.asarray(kernel), None), kernel)
  k, b = linalg.split_bias_row(jnp.asarray(kernel), False)
  assert b is None and k.shape == kernel.shape


def test_block_diagonal_damped_inverse_inverts_each_diagonal_block():
  """Sizes as equal as can be, the larger first (10 in 4: 3, 3, 2, 2); each block
  of M + λI inverted, zeros elsewhere; one block (or more blocks than rows) is
  the plain damped inverse."""
  assert linalg.block_sizes(10, 4) == [3, 3, 2, 2]
  assert linalg.block_sizes(3, 4) == [1, 1, 1]
  rng = np.random.default_rng(0)
  a = rng.normal(size=(10, 10))
  m = a @ a.T + np.eye(10)
  got = np.asarray(linalg.block_diagonal_damped_inverse(jnp.asarray(m), 0.5, 4))
  want, start = np.zeros((10, 10)), 0
  for size in (3, 3, 2, 2):
    end = start + size
    want[start:end, start:end] = np.linalg.inv(m[start:end, start:end] + 0.5 * np.eye(size))
    start = end
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    linalg.block_diagonal_damped_inverse(jnp.asarray(m), 0.5, 1),
    np.linalg.inv(m + 0.5 * np.eye(10)),
    rtol=1e-4,
    atol=1e-6,
  )
