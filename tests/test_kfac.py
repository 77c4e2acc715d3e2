"""K-FAC (``eva_optax._src.kfac``) against explicitly damped factors.

π = sqrt((tr A / dim A) / (tr G / dim G)),  V = (G + √γ/π · I)⁻¹ Ĝ (A + √γ·π · I)⁻¹.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import paper, random_layer, spd

# The submodule (the package exports a function of the same name).
kfac = importlib.import_module("eva_optax._src.kfac")

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [0.003, 0.3])
def test_kfac_equals_explicit_damped_factors(bias, damping):
  rng = np.random.default_rng(1)
  in_dim, out_dim = 5, 4
  grad, g_hat = random_layer(rng, in_dim, out_dim, bias)
  n_in = in_dim + bias
  a_factor = spd(rng, n_in) * 3.0
  g_factor = spd(rng, out_dim) * 0.01
  pi = np.sqrt((np.trace(a_factor) / n_in) / (np.trace(g_factor) / out_dim))
  a_damped = a_factor + np.sqrt(damping) * pi * np.eye(n_in)
  g_damped = g_factor + np.sqrt(damping) / pi * np.eye(out_dim)
  expected = np.linalg.solve(g_damped, g_hat) @ np.linalg.inv(a_damped)
  a_inv, g_inv = kfac.damped_inverses(
      jnp.asarray(a_factor, jnp.float32), jnp.asarray(g_factor, jnp.float32), jnp.float32(damping)
  )
  p = kfac.kfac_precondition(grad, a_inv, g_inv)
  np.testing.assert_allclose(paper(p, bias), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
  np.testing.assert_allclose(float(p.update_dot_grad), np.sum(expected * g_hat), rtol=1e-3)


@pytest.mark.parametrize("kwargs, name", [(dict(inverse_every=0), "inverse_every"), (dict(stats_every=1.5), "stats_every"), (dict(damping=0.0), "damping")])
def test_bad_arguments_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kfac.kfac(0.1, **kwargs)
