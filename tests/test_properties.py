"""Property tests: for random shapes, dampings and statistics (of very different
scales), every preconditioner's update is finite and equals the explicit solve."""

import importlib

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from eva_optax._src import linalg
from models import paper, random_layer, spd

eva = importlib.import_module("eva_optax._src.eva")
foof = importlib.import_module("eva_optax._src.foof")
kfac = importlib.import_module("eva_optax._src.kfac")
eva_shampoo = importlib.import_module("eva_optax._src.eva_shampoo")

SETTINGS = hypothesis.settings(deadline=None, max_examples=30)
layer = dict(
  in_dim=st.integers(1, 6),
  out_dim=st.integers(1, 5),
  bias=st.booleans(),
  damping=st.floats(1e-3, 1.0),
  log_scale=st.floats(-3.0, 3.0),
  seed=st.integers(0, 2**16),
)


def _close(got, want, scale=None):
  """Finite, and equal up to float32 rounding of values of size ``scale``
  (default: the largest expected value)."""
  assert np.all(np.isfinite(got))
  scale = np.abs(want).max() if scale is None else scale
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * (scale + 1e-30))


@SETTINGS
@hypothesis.given(**layer)
def test_eva_property(in_dim, out_dim, bias, damping, log_scale, seed):
  """Sherman–Morrison == solve((ā āᵀ ⊗ ḡ ḡᵀ + γI), vec Ĝ), ā and ḡ of any scale."""
  rng = np.random.default_rng(seed)
  grad, g_hat = random_layer(rng, in_dim, out_dim, bias)
  a = rng.normal(size=in_dim) * 10.0**log_scale
  g = rng.normal(size=out_dim) * 10.0**-log_scale
  a_hat = np.concatenate([a, [1.0]]) if bias else a
  matrix = np.kron(np.outer(a_hat, a_hat), np.outer(g, g)) + damping * np.eye(a_hat.size * out_dim)
  want = np.linalg.solve(matrix, g_hat.T.reshape(-1)).reshape(a_hat.size, out_dim).T
  p = eva.sherman_morrison(
    grad, jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32), jnp.float32(damping)
  )
  # The rule returns γ·(…)⁻¹ vec Ĝ (the 1/γ goes to the KL scaling).
  _close(paper(p, bias), damping * want, scale=np.abs(g_hat).max())


@SETTINGS
@hypothesis.given(**layer)
def test_kfac_property(in_dim, out_dim, bias, damping, log_scale, seed):
  rng = np.random.default_rng(seed)
  grad, g_hat = random_layer(rng, in_dim, out_dim, bias)
  n_in = in_dim + bias
  a_factor, g_factor = spd(rng, n_in, 10.0**log_scale), spd(rng, out_dim, 10.0**-log_scale)
  pi = np.sqrt((np.trace(a_factor) / n_in) / (np.trace(g_factor) / out_dim))
  a_damped = a_factor + np.sqrt(damping) * pi * np.eye(n_in)
  g_damped = g_factor + np.sqrt(damping) / pi * np.eye(out_dim)
  want = np.linalg.solve(g_damped, g_hat) @ np.linalg.inv(a_damped)
  a_inv, g_inv = kfac.damped_inverses(
    jnp.asarray(a_factor, jnp.float32), jnp.asarray(g_factor, jnp.float32), jnp.float32(damping)
  )
  _close(paper(kfac.kfac_precondition(grad, a_inv, g_inv), bias), want)


@SETTINGS
@hypothesis.given(**layer)
def test_foof_property(in_dim, out_dim, bias, damping, log_scale, seed):
  rng = np.random.default_rng(seed)
  grad, g_hat = random_layer(rng, in_dim, out_dim, bias)
  n_in = in_dim + bias
  a_factor = spd(rng, n_in, 10.0**log_scale)
  want = g_hat @ np.linalg.inv(a_factor + damping * np.eye(n_in))
  inverse = linalg.damped_inverse(jnp.asarray(a_factor, jnp.float32), jnp.float32(damping))
  _close(paper(foof.foof_precondition(grad, inverse), bias), want)


def _eva_shampoo_case(shape, damping, log_scale, seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=shape)
  vectors = [rng.normal(size=d) * 10.0**log_scale for d in shape]
  u = vectors[0]
  for s in vectors[1:]:
    u = np.multiply.outer(u, s)
  got = eva_shampoo.sherman_morrison_tensor(
    jnp.asarray(g, jnp.float32),
    [jnp.asarray(s, jnp.float32) for s in vectors],
    jnp.float32(damping),
  )
  return g, u.reshape(-1), np.asarray(got, np.float64).reshape(-1)


shampoo_case = dict(
  shape=st.lists(st.integers(1, 5), min_size=2, max_size=3),
  damping=st.floats(1e-3, 1.0),
  seed=st.integers(0, 2**16),
)


@SETTINGS
@hypothesis.given(log_scale=st.floats(-2.0, 2.0), **shampoo_case)
def test_eva_shampoo_property(shape, damping, log_scale, seed):
  """γ (u uᵀ + γI)⁻¹ vec G with u = ⊗ s_i, by an explicit solve."""
  g, u, got = _eva_shampoo_case(shape, damping, log_scale, seed)
  g = g.reshape(-1)
  if u @ u / damping < 1e8:
    want = damping * np.linalg.solve(np.outer(u, u) + damping * np.eye(u.size), g)
  else:
    # u uᵀ + γI is then too ill-conditioned for the float64 solve itself (at
    # ‖u‖²/γ = 2e14 it is off by 6e-3): compare with the float64 closed form.
    want = g - u * (u @ g) / (u @ u + damping)
  _close(got, want, scale=np.abs(g).max())


@SETTINGS
@hypothesis.given(log_scale=st.floats(-12.0, 12.0), **shampoo_case)
def test_eva_shampoo_extreme_scales(shape, damping, log_scale, seed):
  """Vectors whose outer product over- or underflows float32: still finite and
  equal to the float64 Sherman–Morrison form (the explicit solve is too
  ill-conditioned there, even in float64)."""
  g, u, got = _eva_shampoo_case(shape, damping, log_scale, seed)
  g = g.reshape(-1)
  want = g - u * (u @ g) / (u @ u + damping)
  _close(got, want, scale=np.abs(g).max())
