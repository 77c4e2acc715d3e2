"""Eva-s (``eva_optax._src.eva_shampoo``, vectorized Shampoo) against an explicit solve,
NumPy statistics and the optax contract; its SGD grafting alone is in test_grafting.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src.eva_shampoo import (
  ScaleByEvaShampooState,
  eva_shampoo,
  scale_by_eva_shampoo,
  sherman_morrison_tensor,
)

SHAPES = {"rank2": (5, 4), "rank3": (4, 3, 5), "rank4": (3, 3, 2, 4)}


def _grads(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  # A common offset makes the rank-one part of the curvature matter.
  return [(rng.normal(size=shape) + 0.7).astype(np.float32) for _ in range(steps)]


def _numpy_vectors(grads, stat_decay):
  """s_i from zero: sums (β = 1) or β-EMAs with weight 1 − β, of mean_{axes≠i}(G)."""
  k = grads[0].ndim
  vectors = [np.zeros(d) for d in grads[0].shape]
  weight = 1.0 if stat_decay == 1.0 else 1.0 - stat_decay
  for g in grads:
    g = g.astype(np.float64)
    for i in range(k):
      mean = g.mean(axis=tuple(j for j in range(k) if j != i))
      vectors[i] = stat_decay * vectors[i] + weight * mean
  return vectors


def _explicit_solve(grad, vectors, damping):
  """(u uᵀ + γI)⁻¹ vec(G) with u = s_1 ⊗ … ⊗ s_k built explicitly."""
  letters = "abcdefgh"[: len(vectors)]
  u = np.einsum(",".join(letters) + "->" + letters, *vectors).reshape(-1)
  solved = np.linalg.solve(
    np.outer(u, u) + damping * np.eye(u.size), grad.astype(np.float64).reshape(-1)
  )
  return solved.reshape(grad.shape)


def _normalised(x, norm):
  return x * norm / np.linalg.norm(x)


# ---------------------------------------------------------------------------
# The rule.


@pytest.mark.parametrize("stat_decay", [1.0, 0.6])
@pytest.mark.parametrize("shape", sorted(SHAPES.values()), ids=sorted(SHAPES))
def test_sherman_morrison_and_vectors_equal_explicit_reference(shape, stat_decay):
  damping = 0.05
  grads = _grads(shape, steps=3)
  tx = scale_by_eva_shampoo(damping=damping, stat_decay=stat_decay)
  state = tx.init(jnp.zeros(shape))
  for g in grads:
    update, state = tx.update(jnp.asarray(g), state)

  vectors = _numpy_vectors(grads, stat_decay)
  for got, want in zip(state.dimension_means, vectors):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  last = grads[-1]
  expected = _normalised(_explicit_solve(last, vectors, damping), np.linalg.norm(last))
  np.testing.assert_allclose(update, expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(last), rtol=1e-5)
  # The preconditioner does something: not the gradient itself.
  assert not np.allclose(update, last, rtol=1e-2, atol=1e-2)


def test_projection_is_damping_times_inverse():
  """Without grafting, Ĝ = γ (u uᵀ + γI)⁻¹ vec G exactly (no normalisation needed)."""
  rng = np.random.default_rng(1)
  g = rng.normal(size=(3, 4, 2)).astype(np.float32)
  vectors = [rng.normal(size=d).astype(np.float32) for d in g.shape]
  damping = 0.3
  got = sherman_morrison_tensor(
    jnp.asarray(g), [jnp.asarray(v) for v in vectors], jnp.float32(damping)
  )
  want = damping * _explicit_solve(g, [v.astype(np.float64) for v in vectors], damping)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rank_one_and_scalar_parameters_pass_through():
  rng = np.random.default_rng(2)
  params = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,)), "scale": jnp.zeros(())}
  grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
  tx = scale_by_eva_shampoo()
  state = tx.init(params)
  assert isinstance(state.dimension_means["bias"], optax.MaskedNode)
  assert isinstance(state.dimension_means["scale"], optax.MaskedNode)
  assert [v.shape for v in state.dimension_means["kernel"]] == [(4,), (3,)]
  updates, new_state = tx.update(grads, state)
  np.testing.assert_array_equal(updates["bias"], grads["bias"])
  np.testing.assert_array_equal(updates["scale"], grads["scale"])
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_zero_gradient_gives_zero_update():
  tx = scale_by_eva_shampoo()
  updates, _ = tx.update(jnp.zeros((3, 4)), tx.init(jnp.zeros((3, 4))))
  np.testing.assert_array_equal(updates, jnp.zeros((3, 4)))


# ---------------------------------------------------------------------------
# Composition and the optax contract.


def _params_and_grads(steps=3, seed=3):
  rng = np.random.default_rng(seed)
  params = {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    },
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) + 0.3, jnp.float32), params)
    for _ in range(steps)
  ]
  return params, grads


def _run(tx, steps=3, **extra):
  params, grads = _params_and_grads(steps)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params, **extra)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_alias_equals_chain_with_nesterov():
  lr, wd = 0.1, 5e-4
  alias, _ = _run(eva_shampoo(lr, weight_decay=wd, damping=0.05, stat_decay=0.9))
  chained, _ = _run(
    optax.chain(
      scale_by_eva_shampoo(damping=0.05, stat_decay=0.9),
      optax.add_decayed_weights(wd),
      optax.sgd(lr, momentum=0.9, nesterov=True),
    )
  )
  _assert_trees_close(alias, chained)


def test_jit_compiles_once_and_matches_eager():
  params, grads = _params_and_grads(steps=4)
  tx = eva_shampoo(0.1, weight_decay=1e-4)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, p = tx.init(params), params
  for g in grads:
    p, state = step(p, state, g)
  assert len(traces) == 1
  assert step._cache_size() == 1
  eager, _ = _run(tx, steps=4)
  _assert_trees_close(p, eager, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_gives_identical_updates():
  kw = dict(momentum=0.9, weight_decay=1e-3, damping=0.05, stat_decay=0.8)
  plain, _ = _run(eva_shampoo(0.1, **kw))
  injected, state = _run(optax.inject_hyperparams(eva_shampoo)(learning_rate=0.1, **kw))
  _assert_trees_close(plain, injected, rtol=1e-6, atol=1e-8)
  assert set(state.hyperparams) >= {"learning_rate", "damping", "stat_decay"}


def test_schedules_extra_args_and_apply_if_finite():
  damping = optax.exponential_decay(0.1, 1, 0.5)
  scheduled, _ = _run(
    eva_shampoo(optax.constant_schedule(0.1), damping=damping), unrelated=jnp.ones(2)
  )
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(scheduled))

  params, grads = _params_and_grads(steps=1)
  tx = optax.apply_if_finite(eva_shampoo(0.1), 3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[0])
  updates, new_state = jax.jit(tx.update)(bad, state, params)
  assert int(new_state.notfinite_count) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
  assert isinstance(new_state.inner_state[0], ScaleByEvaShampooState)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(damping=0.0), "damping"),
    (dict(damping=-1.0), "damping"),
    (dict(damping=float("nan")), "damping"),
    (dict(stat_decay=-0.1), "stat_decay"),
    (dict(stat_decay=1.5), "stat_decay"),
    (dict(momentum=1.5), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
  ],
)
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    eva_shampoo(0.1, **kwargs)


def test_negative_learning_rate_is_refused():
  with pytest.raises(ValueError, match="learning_rate"):
    eva_shampoo(-0.1)


def _distance_after_bowl(tx, steps=30_000):
  """‖X − T‖ after ``steps`` updates on the quadratic bowl ‖X − T‖² from X = 0."""
  target = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  loss = lambda p: jnp.sum((p - target) ** 2)

  @jax.jit
  def run(p, s):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (p, s), None, length=steps)[0][0]

  p = jnp.zeros((2, 2))
  return float(jnp.linalg.norm(run(p, tx.init(p)) - target))


def test_quadratic_bowl_stalls_with_the_authors_rule_and_converges_with_relative_damping():
  """Every gradient of ‖X − T‖² is a multiple of X − T, and so are the sums s_i: with
  ‖u‖² ≫ γ the authors' rule projects the whole gradient out and grafting rescales
  rounding noise; relative damping keeps γ/(1+γ) of it and gets where SGD gets."""
  sgd = _distance_after_bowl(optax.sgd(1e-3, momentum=0.9, nesterov=True))
  authors = _distance_after_bowl(eva_shampoo(1e-3))
  relative = _distance_after_bowl(eva_shampoo(1e-3, relative_damping=True))
  assert sgd < 1e-4
  assert authors > 0.5
  assert relative < 1e-4


def test_relative_damping_is_the_formula_with_damping_times_mu():
  """relative_damping=True equals the authors' rule with γ·Π‖s_i‖² as damping."""
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  vectors = [jnp.asarray(rng.normal(size=d) * 5.0, jnp.float32) for d in (4, 3)]
  mu = float(np.prod([np.sum(np.square(np.asarray(s))) for s in vectors]))
  got = sherman_morrison_tensor(g, vectors, jnp.float32(0.03), relative_damping=True)
  want = sherman_morrison_tensor(g, vectors, jnp.float32(0.03 * mu))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# float64, against Eva-s as the authors' code runs it (shampoo/vshampoo.py of
# lzhangbv/eva): PyTorch's dimension order, their momentum.


@pytest.fixture()
def x64():
  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", before)


def _np_authors_eva_s(w, grads, lr, mu, wd, damping):
  """Their step in float64 NumPy on a tensor in PyTorch's order: vectors summed
  from the per-axis means, G contracted with v_i v_iᵀ one axis at a time,
  Ĝ = G − that / (γ + Π‖v_i‖²), grafted to ‖G‖ (+1e-16), + λW (once), then
  buf ← μ·buf + d twice, W ← W − η·buf. Rank ≤ 1: d = G + λW."""
  buf, vectors = np.zeros_like(w), [np.zeros(d) for d in w.shape]
  for g in grads:
    if g.ndim <= 1:
      d = g + wd * w
    else:
      axes = range(g.ndim)
      vectors = [v + g.mean(axis=tuple(j for j in axes if j != i)) for i, v in enumerate(vectors)]
      p, mu_s = g, 1.0
      for v in vectors:
        p = np.tensordot(p, np.outer(v, v), ([0], [0]))
        mu_s *= np.dot(v, v)
      direction = g - p / (damping + mu_s)
      d = direction * np.linalg.norm(g) / (np.linalg.norm(direction) + 1e-16) + wd * w
    buf = mu * buf + d
    buf = mu * buf + d
    w = w - lr * buf
  return w


def test_authors_momentum_equals_their_eva_s_in_float64(x64):
  # Gradients of 0.05 keep Π‖v_i‖² near γ for the 4 steps, so that γ read in
  # float32 (0.03 → 0.029999999329) would show at 1e-9.
  lr, mu, wd, damping = 0.1, 0.9, 0.05, 0.03
  rng = np.random.default_rng(11)
  shapes = {"conv": (3, 3, 2, 4), "dense": (6, 5), "bias": (5,)}
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  grads = [{k: 0.05 * rng.normal(size=s) + 0.02 for k, s in shapes.items()} for _ in range(4)]
  torch = lambda x: (
    x if x.ndim < 2 else np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
  )
  back = lambda x: x if x.ndim < 2 else np.transpose(x, (*range(2, x.ndim), 1, 0))
  want = {
    k: back(_np_authors_eva_s(torch(params[k]), [torch(g[k]) for g in grads], lr, mu, wd, damping))
    for k in shapes
  }
  tx = eva_shampoo(lr, momentum=mu, nesterov="authors", weight_decay=wd, damping=damping)
  p = jax.tree.map(jnp.asarray, params)
  state, update = tx.init(p), jax.jit(tx.update)
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)
  assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(state[0].dimension_means))
  for k in shapes:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-11, atol=1e-13, err_msg=k)
