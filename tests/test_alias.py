"""The SGD tail of every alias (``eva_optax._src.alias``): precondition → weight decay → momentum → learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src.alias import with_sgd


@pytest.mark.parametrize("nesterov", [False, True])
def test_with_sgd_is_the_chain(nesterov):
  scale = optax.scale(0.5)  # a stand-in preconditioner
  tail = with_sgd(scale, 0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
  chain = optax.chain(
    optax.scale(0.5),
    optax.add_decayed_weights(0.01),
    optax.sgd(0.1, momentum=0.9, nesterov=nesterov),
  )
  params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
  grads = [{"w": jnp.asarray([0.5, 0.5, -1.0])}, {"w": jnp.asarray([-1.0, 2.0, 0.0])}]
  p, q, s, t = params, params, tail.init(params), chain.init(params)
  for g in grads:
    u, s = tail.update(g, s, p)
    v, t = chain.update(g, t, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  np.testing.assert_allclose(p["w"], q["w"], rtol=1e-6)
  # The first step by hand: -η (0.5 g + λ w).
  u, _ = tail.update(grads[0], tail.init(params), params)
  want = -0.1 * (0.5 * grads[0]["w"] + 0.01 * params["w"]) * (1.9 if nesterov else 1.0)
  np.testing.assert_allclose(u["w"], want, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
  ],
)
def test_with_sgd_refuses_by_name(kwargs, name):
  args = dict(learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=0.0) | kwargs
  with pytest.raises(ValueError, match=name):
    with_sgd(optax.identity(), args.pop("learning_rate"), **args)


# ---------------------------------------------------------------------------
# The authors' "Nesterov" (shampoo/shampoo.py and shampoo/vshampoo.py of lzhangbv/eva).


def _np_authors_sgd(params, grads, lr, mu, wd):
  """Their momentum step in float64, written as their code does it: the buffer
  takes d, then the Nesterov look-ahead is added to the buffer itself."""
  w, buf = np.asarray(params, np.float64), np.zeros_like(params, np.float64)
  for g in grads:
    d = 0.5 * np.asarray(g, np.float64) + wd * w
    buf = mu * buf + d  # state[MOMENTUM].mul_(μ).add_(d)
    buf = mu * buf + d  # momentum_update (the same tensor).mul_(μ).add_(d)
    w = w - lr * buf
  return w


def _tail_trajectory(tail, params, grads):
  state, p = tail.init(params), params
  for g in grads:
    u, state = tail.update(g, state, p)
    p = optax.apply_updates(p, u)
  return np.asarray(p["w"], np.float64), state


def test_authors_momentum_equals_their_step_and_is_heavy_ball_mu_squared():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(size=5), jnp.float32)} for _ in range(6)]
  lr, mu, wd = 0.1, 0.9, 0.01
  authors = with_sgd(optax.scale(0.5), lr, momentum=mu, nesterov="authors", weight_decay=wd)
  got, state = _tail_trajectory(authors, params, grads)
  want = _np_authors_sgd(params["w"], [g["w"] for g in grads], lr, mu, wd)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The same state structure as optax's momentum (checkpoints, state_shardings).
  textbook = with_sgd(optax.scale(0.5), lr, momentum=mu, nesterov=True, weight_decay=wd)
  assert jax.tree.structure(state) == jax.tree.structure(textbook.init(params))
  # = heavy ball with momentum μ² at the rate η(1 + μ) ...
  heavy = with_sgd(optax.scale(0.5), lr * (1 + mu), momentum=mu**2, nesterov=False, weight_decay=wd)
  np.testing.assert_allclose(got, _tail_trajectory(heavy, params, grads)[0], rtol=1e-6, atol=1e-6)
  # ... and not textbook Nesterov (the first step agrees, later ones do not).
  first = [_tail_trajectory(t, params, grads[:1])[0] for t in (authors, textbook)]
  np.testing.assert_allclose(first[0], first[1], rtol=1e-6)
  assert np.abs(got - _tail_trajectory(textbook, params, grads)[0]).max() > 0.05


def test_authors_momentum_without_momentum_is_sgd():
  params = {"w": jnp.asarray([1.0, -2.0])}
  grads = {"w": jnp.asarray([0.5, 0.25])}
  tx = with_sgd(optax.identity(), 0.1, momentum=None, nesterov="authors", weight_decay=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -0.1 * grads["w"])


@pytest.mark.parametrize("bad", ["Authors", "textbook", 1, None, 0.9])
def test_bad_nesterov_is_refused_by_name(bad):
  with pytest.raises(ValueError, match="nesterov must be True.*'authors'"):
    with_sgd(optax.identity(), 0.1, momentum=0.9, nesterov=bad, weight_decay=0.0)
