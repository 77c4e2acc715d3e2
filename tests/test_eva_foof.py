"""Eva-f (``eva_optax._src.eva_foof``) against dense linear algebra.

V = Ĝ − (Ĝ ā) āᵀ / (‖ā‖² + γ) = γ · Ĝ (ā āᵀ + γI)⁻¹, ā with a trailing 1 when
the layer has a bias; for one layer, and for a group of layers at once.
"""

import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from models import layer_group, paper, random_layer

# The submodule (the package exports a function of the same name).
eva_foof = importlib.import_module("eva_optax._src.eva_foof")

jax.config.update("jax_default_matmul_precision", "highest")


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
  in_dim=st.integers(1, 6),
  out_dim=st.integers(1, 5),
  bias=st.booleans(),
  damping=st.floats(1e-2, 10.0),
  seed=st.integers(0, 2**16),
)
def test_eva_foof_equals_explicit_solve(in_dim, out_dim, bias, damping, seed):
  rng = np.random.default_rng(seed)
  grad, g_hat = random_layer(rng, in_dim, out_dim, bias)
  a = rng.normal(size=in_dim)
  a_hat = np.concatenate([a, [1.0]]) if bias else a
  expected = g_hat @ np.linalg.inv(np.outer(a_hat, a_hat) + damping * np.eye(a_hat.size))
  p = eva_foof.foof_vector_projection(grad, jnp.asarray(a, jnp.float32), jnp.float32(damping))
  scale = np.abs(expected).max() + 1e-6
  np.testing.assert_allclose(paper(p, bias) / damping, expected, rtol=2e-4, atol=2e-4 * scale)
  np.testing.assert_allclose(
    float(p.update_dot_grad) / damping, np.sum(expected * g_hat), rtol=2e-3, atol=1e-4
  )


def test_grouped_eva_foof_equals_explicit_solve_per_layer():
  grads, a, _ = layer_group()
  group = eva_foof.foof_vector_projection_layers(grads, a, 0.03)
  total = 0.0
  for l, (grad, x) in enumerate(zip(grads, a)):
    one = eva_foof.foof_vector_projection(grad, x, 0.03)
    np.testing.assert_allclose(group.kernel[l], one.kernel, rtol=1e-6, atol=1e-7)
    k, b = np.asarray(grad.kernel, np.float64), grad.bias
    for idx in np.ndindex(*k.shape[:-2]):
      full = k[idx] if b is None else np.vstack([k[idx], np.asarray(b, np.float64)[idx][None]])
      x64 = np.asarray(x, np.float64)[idx]
      x64 = x64 if b is None else np.append(x64, 1.0)
      # Ĝ (ā āᵀ + γI)⁻¹ · γ in the (in, out) orientation: (γ I + ā āᵀ)⁻¹ applied on the input side.
      want = 0.03 * np.linalg.solve(np.outer(x64, x64) + 0.03 * np.eye(x64.size), full)
      np.testing.assert_allclose(
        np.asarray(group.kernel[l])[idx], want[: k.shape[-2]], rtol=1e-4, atol=1e-5
      )
      if b is not None:
        np.testing.assert_allclose(np.asarray(group.bias[l])[idx], want[-1], rtol=1e-4, atol=1e-5)
      total += np.sum(want * full)
  np.testing.assert_allclose(group.update_dot_grad, total, rtol=1e-4)
