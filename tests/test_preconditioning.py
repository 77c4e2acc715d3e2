"""Eva-f, FOOF and K-FAC against dense linear algebra, and their periodic refresh."""

import importlib

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax._src import linalg

# The submodules (the package exports functions of the same names).
eva_foof = importlib.import_module("eva_optax._src.eva_foof")
foof = importlib.import_module("eva_optax._src.foof")
kfac = importlib.import_module("eva_optax._src.kfac")
from eva_optax._src.preconditioning import LayerGradient

jax.config.update("jax_default_matmul_precision", "highest")


def _random_layer(rng, in_dim, out_dim, bias):
  kernel = rng.normal(size=(in_dim, out_dim))
  b = rng.normal(size=out_dim) if bias else None
  # Paper orientation Ĝ (out, in[+1]).
  g_hat = np.concatenate([kernel.T, b[:, None]], axis=1) if bias else kernel.T
  grad = LayerGradient(jnp.asarray(kernel, jnp.float32), None if b is None else jnp.asarray(b, jnp.float32))
  return grad, g_hat


def _paper(p, bias):
  """A Preconditioned result in the paper orientation (out, in[+1])."""
  k = np.asarray(p.kernel, np.float64).T
  return np.concatenate([k, np.asarray(p.bias, np.float64)[:, None]], axis=1) if bias else k


def _spd(rng, n):
  m = rng.normal(size=(n, n + 2))
  return m @ m.T / (n + 2)


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(
    in_dim=st.integers(1, 6), out_dim=st.integers(1, 5), bias=st.booleans(),
    damping=st.floats(1e-2, 10.0), seed=st.integers(0, 2**16),
)
def test_eva_foof_equals_explicit_solve(in_dim, out_dim, bias, damping, seed):
  rng = np.random.default_rng(seed)
  grad, g_hat = _random_layer(rng, in_dim, out_dim, bias)
  a = rng.normal(size=in_dim)
  a_hat = np.concatenate([a, [1.0]]) if bias else a
  expected = g_hat @ np.linalg.inv(np.outer(a_hat, a_hat) + damping * np.eye(a_hat.size))
  p = eva_foof.foof_vector_projection(grad, jnp.asarray(a, jnp.float32), jnp.float32(damping))
  scale = np.abs(expected).max() + 1e-6
  np.testing.assert_allclose(_paper(p, bias) / damping, expected, rtol=2e-4, atol=2e-4 * scale)
  np.testing.assert_allclose(float(p.update_dot_grad) / damping, np.sum(expected * g_hat), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damping", [0.003, 0.3])
def test_kfac_equals_explicit_damped_factors(bias, damping):
  rng = np.random.default_rng(1)
  in_dim, out_dim = 5, 4
  grad, g_hat = _random_layer(rng, in_dim, out_dim, bias)
  n_in = in_dim + bias
  a_factor = _spd(rng, n_in) * 3.0
  g_factor = _spd(rng, out_dim) * 0.01
  pi = np.sqrt((np.trace(a_factor) / n_in) / (np.trace(g_factor) / out_dim))
  a_damped = a_factor + np.sqrt(damping) * pi * np.eye(n_in)
  g_damped = g_factor + np.sqrt(damping) / pi * np.eye(out_dim)
  expected = np.linalg.solve(g_damped, g_hat) @ np.linalg.inv(a_damped)
  a_inv, g_inv = kfac.damped_inverses(
      jnp.asarray(a_factor, jnp.float32), jnp.asarray(g_factor, jnp.float32), jnp.float32(damping)
  )
  p = kfac.kfac_precondition(grad, a_inv, g_inv)
  np.testing.assert_allclose(_paper(p, bias), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
  np.testing.assert_allclose(float(p.update_dot_grad), np.sum(expected * g_hat), rtol=1e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_foof_equals_explicit_solve(bias):
  rng = np.random.default_rng(2)
  grad, g_hat = _random_layer(rng, 6, 3, bias)
  a_factor = _spd(rng, 6 + bias)
  damping = 0.05
  expected = g_hat @ np.linalg.inv(a_factor + damping * np.eye(6 + bias))
  inverse = linalg.spd_inverse(linalg.add_to_diagonal(jnp.asarray(a_factor, jnp.float32), damping))
  p = foof.foof_precondition(grad, inverse)
  np.testing.assert_allclose(_paper(p, bias), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_spd_inverse_batched():
  rng = np.random.default_rng(3)
  m = np.stack([_spd(rng, 5) + 0.1 * np.eye(5) for _ in range(3)])
  np.testing.assert_allclose(linalg.spd_inverse(jnp.asarray(m, jnp.float32)), np.linalg.inv(m), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------
# On a model: periodic refresh, statistics, aliases.


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), strides=2)(x)).reshape(x.shape[0], -1)
    x = nn.LayerNorm()(x)
    return nn.Dense(2, use_bias=False)(nn.relu(nn.Dense(5)(x)))


@pytest.fixture(scope="module")
def problem():
  model = Net()
  xs = jax.random.normal(jax.random.key(0), (7, 8, 6, 6, 2))
  ys = jax.random.normal(jax.random.key(1), (7, 8, 2))
  params = model.init(jax.random.key(2), xs[0])["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return params, loss_fn, xs, ys


OPTIMIZERS = {
    "eva_foof": (eva_foof.eva_foof, eva_foof.scale_by_eva_foof, eva_foof.STATISTICS),
    "foof": (foof.foof, foof.scale_by_foof, foof.STATISTICS),
    "kfac": (kfac.kfac, kfac.scale_by_kfac, kfac.STATISTICS),
}


def _train(problem, tx, statistics, steps=4):
  params, loss_fn, xs, ys = problem
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics)
  traces = []

  @jax.jit
  def step(p, s, x, y):
    traces.append(1)
    _, grads, stats = grad_fn(p, x, y)
    updates, s = tx.update(grads, s, p, stats=stats)
    return optax.apply_updates(p, updates), s

  state, p, states = tx.init(params), params, []
  for x, y in list(zip(xs, ys))[:steps]:
    p, state = step(p, state, x, y)
    states.append(state)
  assert len(traces) == 1, "the step must compile once"
  return p, states


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_alias_equals_preconditioner_then_sgd(problem, name):
  alias, scale_by, statistics = OPTIMIZERS[name]
  kw = dict(damping=0.1)
  if name != "eva_foof":
    kw["inverse_every"] = 2
  a, _ = _train(problem, alias(0.05, momentum=0.9, weight_decay=1e-3, **kw), statistics)
  b, _ = _train(
      problem,
      optax.chain(scale_by(0.05, **kw), optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9)),
      statistics,
  )
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a, b)
  # Something moved, and the pass-through LayerNorm got plain SGD.
  assert not np.allclose(a["Dense_0"]["kernel"], problem[0]["Dense_0"]["kernel"])


@pytest.mark.parametrize("name", ["foof", "kfac"])
def test_inverses_refresh_exactly_every_n_steps(problem, name):
  alias, _, statistics = OPTIMIZERS[name]
  _, states = _train(problem, alias(0.05, inverse_every=3), statistics, steps=7)
  caches = [s[0].cache for s in states]  # state of the preconditioner in the chain
  same = lambda i, j: all(
      np.array_equal(u, v) for u, v in zip(jax.tree.leaves(caches[i]), jax.tree.leaves(caches[j]))
  )
  # Refreshed after updates 0, 3, 6; fixed in between.
  assert same(0, 1) and same(1, 2)
  assert not same(2, 3)
  assert same(3, 4) and same(4, 5)
  assert not same(5, 6)
  # The refresh uses the running factors of that step.
  s3 = states[3][0]
  factor = (s3.input_factor if name == "foof" else s3.input_factor)["Dense_0"]
  inverse = s3.cache["input_inverse"]["Dense_0"]
  if name == "foof":
    np.testing.assert_allclose(inverse @ (factor + 0.03 * np.eye(factor.shape[0])), np.eye(factor.shape[0]), atol=2e-3)


def test_kfac_stats_every_updates_factors_on_schedule(problem):
  _, states = _train(problem, kfac.kfac(0.05, stats_every=2, inverse_every=2), kfac.STATISTICS, steps=5)
  factors = [np.asarray(s[0].input_factor["Dense_0"]) for s in states]
  assert not np.array_equal(factors[0], 0 * factors[0])
  assert np.array_equal(factors[0], factors[1])
  assert not np.array_equal(factors[1], factors[2])
  assert np.array_equal(factors[2], factors[3])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_missing_statistics_is_a_clear_error(problem, name):
  alias, _, statistics = OPTIMIZERS[name]
  params, loss_fn, xs, ys = problem
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=("output_grad_mean",))(params, xs[0], ys[0])
  tx = alias(0.1)
  with pytest.raises(ValueError, match="statistics="):
    tx.update(grads, tx.init(params), params, stats=stats)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inject_hyperparams(problem, name):
  alias, _, statistics = OPTIMIZERS[name]
  a, _ = _train(problem, alias(0.05, damping=0.1), statistics, steps=2)
  b, _ = _train(problem, optax.inject_hyperparams(alias)(learning_rate=0.05, damping=0.1), statistics, steps=2)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.parametrize("kwargs, name", [(dict(inverse_every=0), "inverse_every"), (dict(stats_every=1.5), "stats_every"), (dict(damping=0.0), "damping")])
def test_bad_arguments_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kfac.kfac(0.1, **kwargs)


@pytest.mark.parametrize("name, every", [("kfac", 3), ("foof", 2)])
def test_gated_capture_equals_ungated(problem, name, every):
  """factors_due(opt_state) computes the factors only on the steps that use
  them; the trajectory is the one of the capture computing them every step."""
  alias, _, statistics = OPTIMIZERS[name]
  params, loss_fn, xs, ys = problem
  tx = alias(0.05, stats_every=every, inverse_every=2)
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics)

  def run(gated):
    @jax.jit
    def step(p, s, x, y):
      kw = dict(factors_due=eva_optax.factors_due(s)) if gated else {}
      _, grads, stats = grad_fn(p, x, y, **kw)
      factor = jax.tree.leaves(stats, is_leaf=lambda e: isinstance(e, eva_optax.LayerStats))[0].input_factor
      updates, s = tx.update(grads, s, p, stats=stats)
      return optax.apply_updates(p, updates), s, jnp.any(factor != 0)

    p, s, computed = params, tx.init(params), []
    for x, y in zip(xs, ys):
      p, s, c = step(p, s, x, y)
      computed.append(bool(c))
    return p, computed

  ungated, always = run(False)
  gated, computed = run(True)
  assert always == [True] * len(xs)
  assert computed == [i % every == 0 for i in range(len(xs))]
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), gated, ungated)


def test_factors_due_reads_the_state_through_wrappers(problem):
  """K-FAC's state is found by its FactorGate inside chain and inject_hyperparams,
  and says ``due`` exactly before the updates that average the factors."""
  params, loss_fn, xs, ys = problem
  tx = optax.chain(
      optax.identity(),
      optax.inject_hyperparams(kfac.kfac)(learning_rate=0.1, stats_every=4, inverse_every=1),
  )
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=eva_optax.KFAC_STATISTICS)
  state, due = tx.init(params), []
  for i in range(6):
    due.append(bool(eva_optax.factors_due(state)))
    _, grads, stats = grad_fn(params, xs[i % len(xs)], ys[i % len(xs)])
    _, state = tx.update(grads, state, params, stats=stats)
  assert due == [True, False, False, False, True, False]
  with pytest.raises(ValueError, match="no optimizer that averages factors"):
    eva_optax.factors_due(optax.sgd(0.1).init(params))


def test_stats_that_match_no_layer_are_an_error(problem):
  """Stats for another nesting of the params (a prefix) or empty stats must not
  silently turn the update into plain SGD."""
  params, loss_fn, xs, ys = problem
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, xs[0], ys[0])
  tx = eva_optax.eva(0.1)
  for wrapped_grads, wrapped_params, bad_stats in [
      (grads, params, {}),
      ({"model": grads}, {"model": params}, stats),
  ]:
    state = tx.init(wrapped_params)
    with pytest.raises(ValueError, match="no statistics for the layer parameters at .*Dense_0"):
      tx.update(wrapped_grads, state, wrapped_params, stats=bad_stats)
