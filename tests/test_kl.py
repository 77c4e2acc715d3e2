"""The global KL scaling (``eva_optax._src.kl``) against its formulas.

KL clip: ν = min(1, sqrt(κ / (η² Σ⟨V, Ĝ⟩))); KL normalisation:
ν = 1 / sqrt(Σ⟨V, Ĝ⟩); both ν = 1 when the sum is not positive; 'none': ν = 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src import kl


@pytest.mark.parametrize(
  "dot, lr, clip, expected",
  [
    (4.0, 0.1, 0.001, min(1.0, np.sqrt(0.001 / (0.01 * 4.0)))),
    (1e-6, 0.1, 0.001, 1.0),  # small updates are not scaled up
    (0.0, 0.1, 0.001, 1.0),
    (-1.0, 0.1, 0.001, 1.0),
    (2.0, 0.0, 0.001, 1.0),
  ],
)
def test_kl_clip_factor(dot, lr, clip, expected):
  got = kl.kl_clip_factor(jnp.float32(dot), jnp.float32(lr), jnp.float32(clip))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@pytest.mark.parametrize("dot, expected", [(4.0, 0.5), (0.25, 2.0), (0.0, 1.0), (-3.0, 1.0)])
def test_kl_normalise_factor(dot, expected):
  np.testing.assert_allclose(float(kl.kl_normalise_factor(jnp.float32(dot))), expected, rtol=1e-6)


def _clip_by_hand(dot, lr, clip):
  """ν of the KL clip, the docstring's formula in float64."""
  if dot <= 0:
    return 1.0
  return min(1.0, np.sqrt(clip / (lr**2 * dot)))


def test_kl_clip_factor_equals_the_formula_on_a_grid():
  """Over dots, learning rates and clips spanning several decades, clipped or not."""
  dots = np.array([-2.0, 0.0, 1e-8, 3e-4, 0.7, 12.0, 5e5])
  lrs = np.array([1e-3, 0.1, 2.0])
  clips = np.array([1e-6, 1e-3, 1.0])
  d, l, c = (a.reshape(-1) for a in np.meshgrid(dots, lrs, clips, indexing="ij"))
  got = np.asarray(
    kl.kl_clip_factor(
      jnp.asarray(d, jnp.float32), jnp.asarray(l, jnp.float32), jnp.asarray(c, jnp.float32)
    )
  )
  want = np.array([_clip_by_hand(*v) for v in zip(d, l, c)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(got <= 1.0)
  assert np.any(want < 1.0) and np.any(want == 1.0)  # both branches are exercised


def test_kl_normalise_factor_equals_one_over_the_root():
  dots = np.array([1e-6, 0.04, 1.0, 9.0, 1e6])
  got = np.asarray(kl.kl_normalise_factor(jnp.asarray(dots, jnp.float32)))
  np.testing.assert_allclose(got, 1.0 / np.sqrt(dots), rtol=1e-5)


def test_scale_factor_dispatches_by_name():
  dot, lr, clip = jnp.float32(8.0), jnp.float32(0.5), jnp.float32(0.02)
  np.testing.assert_allclose(
    float(kl.scale_factor("kl_clip", dot, lr, clip)), np.sqrt(0.02 / (0.25 * 8.0)), rtol=1e-6
  )
  np.testing.assert_allclose(
    float(kl.scale_factor("kl_normalise", dot, None, None)), 1.0 / np.sqrt(8.0), rtol=1e-6
  )
  with pytest.raises(ValueError, match="scaling"):
    kl.scale_factor("kl_other", dot, lr, clip)


@pytest.mark.parametrize(
  "scaling, ok",
  [("kl_clip", True), ("kl_normalise", True), ("none", True), ("clip", False), ("", False)],
)
def test_check_scaling_accepts_only_the_three_names(scaling, ok):
  if ok:
    kl.check_scaling(scaling)
  else:
    with pytest.raises(ValueError, match="scaling must be one of"):
      kl.check_scaling(scaling)


def test_no_scaling_leaves_the_projection_unscaled_for_an_optimizer_behind_it():
  """``scaling='none'``: ν = 1 and V the projection without 1/γ (Eva-f's
  Ĝ − (Ĝā)āᵀ/(‖ā‖² + γ), by hand), the form to put in front of Adam."""
  import flax.linen as nn

  import eva_optax

  np.testing.assert_array_equal(kl.scale_factor("none", jnp.float32(8.0), None, None), 1.0)
  kl.check_scaling("none")
  model = nn.Dense(3, use_bias=False)
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 1.0, (8, 4)), jnp.float32)
  y = jnp.ones((8, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = lambda p, x, y: jnp.mean(jnp.square(model.apply({"params": p}, x) - y))
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=("input_mean",))(params, x, y)
  gamma = 0.5
  tx = eva_optax.scale_by_eva_foof(damping=gamma, scaling="none")
  got, _ = tx.update(grads, tx.init(params), params, stats=stats)
  g, a = np.asarray(grads["kernel"], np.float64), np.asarray(x, np.float64).mean(0)
  want = g - np.outer(a, a @ g) / (a @ a + gamma)
  np.testing.assert_allclose(got["kernel"], want, rtol=1e-5, atol=1e-7)
  assert np.abs(want - g).max() > 0.1 * np.abs(g).max()  # the correction is not negligible
  # kl_normalise is the same V divided by sqrt(Σ⟨V, Ĝ⟩).
  normalised = eva_optax.scale_by_eva_foof(damping=gamma, scaling="kl_normalise")
  n, _ = normalised.update(grads, normalised.init(params), params, stats=stats)
  np.testing.assert_allclose(n["kernel"] * np.sqrt(np.vdot(want, g)), want, rtol=1e-5, atol=1e-7)
  # Eva: the clip form V/γ with ν = 1 (a clip never reached), times γ.
  full = eva_optax.value_and_grad(loss_fn)
  _, grads, stats = full(params, x, y)
  none = eva_optax.scale_by_eva(damping=gamma, scaling="none")
  clip = eva_optax.scale_by_eva(1.0, damping=gamma, kl_clip=1e12)
  u_none, _ = none.update(grads, none.init(params), params, stats=stats)
  u_clip, _ = clip.update(grads, clip.init(params), params, stats=stats)
  np.testing.assert_allclose(u_none["kernel"], gamma * u_clip["kernel"], rtol=1e-5, atol=1e-8)
