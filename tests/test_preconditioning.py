"""The layer-wise skeleton (``eva_optax._src.preconditioning``) shared by Eva, Eva-f, K-FAC and FOOF.

What every rule built on :func:`layerwise_transformation` gets from it, run on
one model through the rules that use each part: the alias is the preconditioner
then SGD; the running factors and the refreshed inverses follow ``stats_every``
and ``inverse_every`` under one compilation; ``factors_due`` finds the gate
through optax's wrappers; statistics that are missing or match no layer are an
error. Then the pieces alone: a one-layer rule applied to a group
(``each_layer``), ``apply_layerwise`` and ``update_averages``.
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax._src import preconditioning
from eva_optax._src.preconditioning import LayerGradient, Preconditioned
from eva_optax._src.statistics import LayerStats, PassThrough

# The submodules (the package exports functions of the same names).
eva_foof = importlib.import_module("eva_optax._src.eva_foof")
foof = importlib.import_module("eva_optax._src.foof")
kfac = importlib.import_module("eva_optax._src.kfac")

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------
# On a model: aliases, periodic refresh, the factors' gate, errors.


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
  factor = np.asarray(s3.input_factor["Dense_0"], np.float64)
  inverse = np.asarray(s3.cache["input_inverse"]["Dense_0"], np.float64)
  if name == "foof":
    damping = 0.03
  else:  # K-FAC's π-split damping: √γ·π on A, π² = (tr A/dim A)/(tr G/dim G)
    g = np.asarray(s3.output_grad_factor["Dense_0"], np.float64)
    pi = np.sqrt((np.trace(factor) / len(factor)) / (np.trace(g) / len(g)))
    damping = np.sqrt(0.03) * pi
    want_g = np.linalg.inv(g + np.sqrt(0.03) / pi * np.eye(len(g)))
    np.testing.assert_allclose(s3.cache["output_grad_inverse"]["Dense_0"], want_g, rtol=2e-3, atol=1e-5 * np.abs(want_g).max())
  np.testing.assert_allclose(inverse @ (factor + damping * np.eye(len(factor))), np.eye(len(factor)), atol=2e-3)


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


# ---------------------------------------------------------------------------
# The pieces alone: each_layer, apply_layerwise, update_averages.


def _double(grad, stats, gamma):
  """A one-layer rule: V = scale · Ĝ / γ, and ⟨V, Ĝ⟩."""
  k = grad.kernel * stats["scale"] / gamma
  b = None if grad.bias is None else grad.bias * stats["scale"] / gamma
  dot = jnp.vdot(k, grad.kernel) + (0.0 if b is None else jnp.vdot(b, grad.bias))
  return Preconditioned(k, b, dot)


def test_each_layer_applies_the_rule_to_every_layer_and_sums_the_dots():
  rng = np.random.default_rng(0)
  grads = [
      LayerGradient(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), jnp.asarray(rng.normal(size=3), jnp.float32)),
      LayerGradient(jnp.asarray(rng.normal(size=(2, 5, 2)), jnp.float32), None),
  ]
  stats = [{"scale": jnp.float32(2.0)}, {"scale": jnp.float32(-1.0)}]
  group = preconditioning.each_layer(_double)(grads, stats, jnp.float32(0.5))
  assert isinstance(group.kernel, tuple) and len(group.kernel) == 2
  assert group.bias[1] is None
  total = 0.0
  for l, (grad, s) in enumerate(zip(grads, stats)):
    one = _double(grad, s, jnp.float32(0.5))
    np.testing.assert_array_equal(group.kernel[l], one.kernel)
    total += float(one.update_dot_grad)
  np.testing.assert_array_equal(group.bias[0], _double(grads[0], stats[0], 0.5).bias)
  np.testing.assert_allclose(float(group.update_dot_grad), total, rtol=1e-6)
  np.testing.assert_allclose(total, 4.0 * float(jnp.sum(grads[0].kernel**2) + jnp.sum(grads[0].bias**2)) - 2.0 * float(jnp.sum(grads[1].kernel**2)), rtol=1e-5)


def test_apply_layerwise_preconditions_the_named_layers_scales_them_and_passes_the_rest():
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  updates = {
      "conv": {"kernel": normal(3, 3, 2, 4), "bias": normal(4)},
      "dense": {"kernel": normal(6, 2)},
      "LayerNorm_0": {"scale": normal(6), "bias": normal(6)},
      "other": {"kernel": normal(2, 2), "bias": normal(2)},  # a layer, not preconditioned
  }
  slots = preconditioning.find_layer_slots(updates)
  layers = {("conv",): {"scale": 2.0}, ("dense",): {"scale": 3.0}}
  seen = []

  def group_rule(grads, stats):
    seen.extend((g.kernel.shape, None if g.bias is None else g.bias.shape) for g in grads)
    return preconditioning.each_layer(_double)(grads, stats, 1.0)

  out = preconditioning.apply_layerwise(updates, slots, layers, group_rule, lambda total: 1.0 / total)
  # The rule sees the matrices (in, out), in the order of ``layers``.
  assert seen == [((18, 4), (4,)), ((6, 2), None)]
  total = sum(
      s * float(jnp.sum(updates[name]["kernel"] ** 2) + jnp.sum(updates[name].get("bias", 0.0) ** 2))
      for name, s in (("conv", 2.0), ("dense", 3.0))
  )
  for name, s in (("conv", 2.0), ("dense", 3.0)):
    for leaf in updates[name]:
      np.testing.assert_allclose(out[name][leaf], s * updates[name][leaf] / total, rtol=1e-5)
  for name in ("LayerNorm_0", "other"):
    jax.tree.map(np.testing.assert_array_equal, out[name], updates[name])
  # Nothing to precondition: the updates themselves.
  assert preconditioning.apply_layerwise(updates, slots, {}, group_rule, lambda t: t) is updates


def _averages_setup():
  params = {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, "norm": {"scale": jnp.zeros(2)}}
  slots = preconditioning.find_layer_slots(params)
  averages = {
      name: preconditioning.zero_statistics(slots, name)
      for name in ("input_mean", "output_grad_mean", "input_factor")
  }
  return slots, averages


def test_update_averages_first_takes_the_statistics_then_averages_them():
  slots, averages = _averages_setup()
  first = LayerStats(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 5.0]), 2.0 * jnp.eye(4))
  second = LayerStats(jnp.asarray([3.0, 2.0, 1.0]), jnp.asarray([0.0, 1.0]), 4.0 * jnp.eye(4))
  stats = {"Dense_0": first, "norm": PassThrough("LayerNorm", "no kernel")}
  per_layer, averages = preconditioning.update_averages(slots, stats, averages, 0.25, jnp.int32(0), "test")
  assert set(per_layer) == {("Dense_0",)}
  np.testing.assert_array_equal(per_layer[("Dense_0",)]["input_mean"], first.input_mean)
  np.testing.assert_array_equal(averages["input_factor"]["Dense_0"], first.input_factor)
  per_layer, averages = preconditioning.update_averages(
      slots, {"Dense_0": second}, averages, 0.25, jnp.int32(1), "test"
  )
  for name in ("input_mean", "output_grad_mean", "input_factor"):
    want = 0.25 * getattr(first, name) + 0.75 * getattr(second, name)
    np.testing.assert_allclose(per_layer[("Dense_0",)][name], want, rtol=1e-6)
    np.testing.assert_allclose(averages[name]["Dense_0"], want, rtol=1e-6)


def test_update_averages_keeps_what_is_not_finite_and_factors_not_computed():
  """A NaN entry of ā keeps that entry's old value only; a factor that is all
  zeros (gated off by factors_due) or has an Inf keeps the old factor."""
  slots, averages = _averages_setup()
  old = LayerStats(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 5.0]), 2.0 * jnp.eye(4))
  _, averages = preconditioning.update_averages(slots, {"Dense_0": old}, averages, 0.5, jnp.int32(0), "test")
  for factor in (jnp.zeros((4, 4)), jnp.eye(4).at[0, 1].set(jnp.inf)):
    bad = LayerStats(jnp.asarray([jnp.nan, 4.0, 5.0]), jnp.asarray([jnp.inf, 1.0]), factor)
    per_layer, after = preconditioning.update_averages(slots, {"Dense_0": bad}, averages, 0.5, jnp.int32(1), "test")
    np.testing.assert_allclose(after["input_mean"]["Dense_0"], [1.0, 3.0, 4.0])
    np.testing.assert_allclose(after["output_grad_mean"]["Dense_0"], [4.0, 3.0])
    np.testing.assert_array_equal(after["input_factor"]["Dense_0"], old.input_factor)
    np.testing.assert_array_equal(per_layer[("Dense_0",)]["input_factor"], old.input_factor)


def test_update_averages_names_what_is_missing():
  slots, averages = _averages_setup()
  with pytest.raises(ValueError, match=r"needs the statistics .*\['input_factor'\] were not captured"):
    preconditioning.update_averages(
        slots, {"Dense_0": LayerStats(jnp.ones(3), jnp.ones(2))}, averages, 0.5, jnp.int32(0), "test"
    )
  with pytest.raises(ValueError, match=r"test: no statistics for the layer parameters at \['Dense_0'\]"):
    preconditioning.update_averages(slots, {}, averages, 0.5, jnp.int32(0), "test")
