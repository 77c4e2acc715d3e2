"""FOOF (``eva_optax._src.foof``) against an explicit solve: V = Ĝ (A + γI)⁻¹."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src import linalg
from models import paper, random_layer, spd

# The submodule (the package exports a function of the same name).
foof = importlib.import_module("eva_optax._src.foof")

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("bias", [False, True])
def test_foof_equals_explicit_solve(bias):
  rng = np.random.default_rng(2)
  grad, g_hat = random_layer(rng, 6, 3, bias)
  a_factor = spd(rng, 6 + bias)
  damping = 0.05
  expected = g_hat @ np.linalg.inv(a_factor + damping * np.eye(6 + bias))
  inverse = linalg.spd_inverse(linalg.add_to_diagonal(jnp.asarray(a_factor, jnp.float32), damping))
  p = foof.foof_precondition(grad, inverse)
  np.testing.assert_allclose(
    paper(p, bias), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
  )
