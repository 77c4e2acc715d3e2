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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax._src import layer_averages, layerwise_rule, preconditioning, state_entries
from eva_optax._src.layerwise_rule import LayerGradient, Preconditioned
from eva_optax._src.layers import find_layer_slots
from eva_optax._src.statistics import (
  EVA_STATISTICS,
  KernelLayout,
  LayerStats,
  PassThrough,
  WithBiasRow,
  together,
)

# The submodules (the package exports functions of the same names).
eva_foof = importlib.import_module("eva_optax._src.eva_foof")
foof = importlib.import_module("eva_optax._src.foof")
kfac = importlib.import_module("eva_optax._src.kfac")
eva = importlib.import_module("eva_optax._src.eva")

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
    optax.chain(
      scale_by(0.05, **kw), optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9)
    ),
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
  inverse = np.asarray(s3.cache.input_inverse["Dense_0"], np.float64)
  if name == "foof":
    damping = 0.03
  else:  # K-FAC's π-split damping: √γ·π on A, π² = (tr A/dim A)/(tr G/dim G)
    g = np.asarray(s3.output_grad_factor["Dense_0"], np.float64)
    pi = np.sqrt((np.trace(factor) / len(factor)) / (np.trace(g) / len(g)))
    damping = np.sqrt(0.03) * pi
    want_g = np.linalg.inv(g + np.sqrt(0.03) / pi * np.eye(len(g)))
    np.testing.assert_allclose(
      s3.cache.output_grad_inverse["Dense_0"],
      want_g,
      rtol=2e-3,
      atol=1e-5 * np.abs(want_g).max(),
    )
  np.testing.assert_allclose(
    inverse @ (factor + damping * np.eye(len(factor))), np.eye(len(factor)), atol=2e-3
  )


def test_kfac_stats_every_updates_factors_on_schedule(problem):
  _, states = _train(
    problem, kfac.kfac(0.05, stats_every=2, inverse_every=2), kfac.STATISTICS, steps=5
  )
  factors = [np.asarray(s[0].input_factor["Dense_0"]) for s in states]
  assert not np.array_equal(factors[0], 0 * factors[0])
  assert np.array_equal(factors[0], factors[1])
  assert not np.array_equal(factors[1], factors[2])
  assert np.array_equal(factors[2], factors[3])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_missing_statistics_is_a_clear_error(problem, name):
  alias, _, statistics = OPTIMIZERS[name]
  params, loss_fn, xs, ys = problem
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=("output_grad_mean",))(
    params, xs[0], ys[0]
  )
  tx = alias(0.1)
  with pytest.raises(ValueError, match="statistics="):
    tx.update(grads, tx.init(params), params, stats=stats)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inject_hyperparams(problem, name):
  alias, _, statistics = OPTIMIZERS[name]
  a, _ = _train(problem, alias(0.05, damping=0.1), statistics, steps=2)
  b, _ = _train(
    problem, optax.inject_hyperparams(alias)(learning_rate=0.05, damping=0.1), statistics, steps=2
  )
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
      factor = jax.tree.leaves(stats, is_leaf=lambda e: isinstance(e, eva_optax.LayerStats))[
        0
      ].input_factor
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
    LayerGradient(
      jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
      jnp.asarray(rng.normal(size=3), jnp.float32),
    ),
    LayerGradient(jnp.asarray(rng.normal(size=(2, 5, 2)), jnp.float32), None),
  ]
  stats = [{"scale": jnp.float32(2.0)}, {"scale": jnp.float32(-1.0)}]
  group = layerwise_rule.each_layer(_double)(grads, stats, jnp.float32(0.5))
  assert isinstance(group.kernel, tuple) and len(group.kernel) == 2
  assert group.bias[1] is None
  total = 0.0
  for l, (grad, s) in enumerate(zip(grads, stats)):
    one = _double(grad, s, jnp.float32(0.5))
    np.testing.assert_array_equal(group.kernel[l], one.kernel)
    total += float(one.update_dot_grad)
  np.testing.assert_array_equal(group.bias[0], _double(grads[0], stats[0], 0.5).bias)
  np.testing.assert_allclose(float(group.update_dot_grad), total, rtol=1e-6)
  np.testing.assert_allclose(
    total,
    4.0 * float(jnp.sum(grads[0].kernel ** 2) + jnp.sum(grads[0].bias ** 2))
    - 2.0 * float(jnp.sum(grads[1].kernel ** 2)),
    rtol=1e-5,
  )


def test_apply_layerwise_preconditions_the_named_layers_scales_them_and_passes_the_rest():
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  updates = {
    "conv": {"kernel": normal(3, 3, 2, 4), "bias": normal(4)},
    "dense": {"kernel": normal(6, 2)},
    "LayerNorm_0": {"scale": normal(6), "bias": normal(6)},
    "other": {"kernel": normal(2, 2), "bias": normal(2)},  # a layer, not preconditioned
  }
  slots = find_layer_slots(updates)
  layers = {("conv",): {"scale": 2.0}, ("dense",): {"scale": 3.0}}
  seen = []

  def group_rule(grads, stats):
    seen.extend((g.kernel.shape, None if g.bias is None else g.bias.shape) for g in grads)
    return layerwise_rule.each_layer(_double)(grads, stats, 1.0)

  out = preconditioning.apply_layerwise(
    updates, slots, layers, group_rule, lambda total: 1.0 / total
  )
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
  params = {
    "Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
    "norm": {"scale": jnp.zeros(2)},
  }
  slots = find_layer_slots(params)
  trees = state_entries.zero_averages(slots, ("input_mean", "output_grad_mean", "input_factor"))
  # As an update reads the state: {statistic: {module path: entry}}.
  return slots, {n: state_entries.flatten_entries(t) for n, t in trees.items()}


def test_update_averages_first_takes_the_statistics_then_averages_them():
  slots, averages = _averages_setup()
  first = LayerStats(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 5.0]), 2.0 * jnp.eye(4))
  second = LayerStats(jnp.asarray([3.0, 2.0, 1.0]), jnp.asarray([0.0, 1.0]), 4.0 * jnp.eye(4))
  stats = {"Dense_0": first, "norm": PassThrough("LayerNorm", "no kernel")}
  per_layer, averages = layer_averages.update_averages(
    slots, stats, averages, 0.25, jnp.int32(0), "test"
  )
  assert all(set(v) == {("Dense_0",)} for v in per_layer.values())
  np.testing.assert_array_equal(per_layer["input_mean"][("Dense_0",)], first.input_mean)
  # A of a layer with a bias: kept as its kernel rows and its bias row.
  stored = averages["input_factor"][("Dense_0",)]
  assert isinstance(stored, WithBiasRow) and stored.rows.shape == (3, 4)
  np.testing.assert_array_equal(stored.matrix(), first.input_factor)
  per_layer, averages = layer_averages.update_averages(
    slots, {"Dense_0": second}, averages, 0.25, jnp.int32(1), "test"
  )
  for name in ("input_mean", "output_grad_mean", "input_factor"):
    want = 0.25 * getattr(first, name) + 0.75 * getattr(second, name)
    np.testing.assert_allclose(together(per_layer[name][("Dense_0",)]), want, rtol=1e-6)
    np.testing.assert_allclose(together(averages[name][("Dense_0",)]), want, rtol=1e-6)
  # A step that is not due (stats_every) keeps every average as it was.
  kept, unchanged = layer_averages.update_averages(
    slots, {"Dense_0": first}, averages, 0.25, jnp.int32(2), "test", due=jnp.bool_(False)
  )
  for name in ("input_mean", "output_grad_mean", "input_factor"):
    np.testing.assert_array_equal(
      together(kept[name][("Dense_0",)]), together(averages[name][("Dense_0",)])
    )
    np.testing.assert_array_equal(
      together(unchanged[name][("Dense_0",)]), together(averages[name][("Dense_0",)])
    )


def test_update_averages_keeps_what_is_not_finite_and_factors_not_computed():
  """A NaN entry of ā keeps that entry's old value only; a factor that is all
  zeros (gated off by factors_due) or has an Inf keeps the old factor."""
  slots, averages = _averages_setup()
  old = LayerStats(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([4.0, 5.0]), 2.0 * jnp.eye(4))
  _, averages = layer_averages.update_averages(
    slots, {"Dense_0": old}, averages, 0.5, jnp.int32(0), "test"
  )
  for factor in (jnp.zeros((4, 4)), jnp.eye(4).at[0, 1].set(jnp.inf)):
    bad = LayerStats(jnp.asarray([jnp.nan, 4.0, 5.0]), jnp.asarray([jnp.inf, 1.0]), factor)
    per_layer, after = layer_averages.update_averages(
      slots, {"Dense_0": bad}, averages, 0.5, jnp.int32(1), "test"
    )
    np.testing.assert_allclose(after["input_mean"][("Dense_0",)], [1.0, 3.0, 4.0])
    np.testing.assert_allclose(after["output_grad_mean"][("Dense_0",)], [4.0, 3.0])
    np.testing.assert_array_equal(together(after["input_factor"][("Dense_0",)]), old.input_factor)
    np.testing.assert_array_equal(
      together(per_layer["input_factor"][("Dense_0",)]), old.input_factor
    )


def test_update_averages_names_what_is_missing():
  slots, averages = _averages_setup()
  with pytest.raises(
    ValueError, match=r"needs the statistics .*\['input_factor'\] were not captured"
  ):
    layer_averages.update_averages(
      slots, {"Dense_0": LayerStats(jnp.ones(3), jnp.ones(2))}, averages, 0.5, jnp.int32(0), "test"
    )
  with pytest.raises(
    ValueError, match=r"test: no statistics for the layer parameters at \['Dense_0'\]"
  ):
    layer_averages.update_averages(slots, {}, averages, 0.5, jnp.int32(0), "test")


# ---------------------------------------------------------------------------
# Layouts the parameters leave open: the state makes room, the capture decides.


class OpenLayouts(nn.Module):
  """Layers whose kernel layout cannot be told from the parameters: an Einsum
  contracting its middle axis (with and without bias), a depthwise conv, and a
  first conv on one input channel (whose kernel a depthwise conv could have)."""

  @nn.compact
  def __call__(self, x):  # x: (batch, 5, 5, 1)
    h = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))  # kernel (3, 3, 1, 4)
    h = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4, padding="VALID", use_bias=False)(h))
    t = h.reshape(h.shape[0], 9, 4)  # (B, T, D)
    t = jnp.tanh(nn.Einsum((3, 4, 2), "BTD,NDH->BTNH")(t)).reshape(t.shape[0], 9, 6)
    t = nn.Einsum((2, 6, 3), "BTD,NDH->BTNH", use_bias=False)(t)
    return nn.Dense(2)(t.reshape(t.shape[0], -1))


OPEN_LAYOUTS = {
  "eva": (eva.eva, EVA_STATISTICS),
  "eva_foof": (eva_foof.eva_foof, eva_foof.STATISTICS),
  "foof": (foof.foof, foof.STATISTICS),
  "kfac": (kfac.kfac, kfac.STATISTICS),
}


@pytest.mark.parametrize("name", sorted(OPEN_LAYOUTS))
def test_tx_init_alone_equals_the_captured_layouts_given(name):
  """For every optimizer built on the capture: tx.init(params) alone trains, step
  after step, exactly as with layouts=layouts_of(stats); the layers whose
  layout the parameters leave open keep their statistics in flat buffers."""
  alias, statistics = OPEN_LAYOUTS[name]
  model = OpenLayouts()
  xs = jax.random.normal(jax.random.key(0), (3, 6, 5, 5, 1))
  ys = jax.random.normal(jax.random.key(1), (3, 6, 2))
  params = model.init(jax.random.key(2), xs[0])["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics)
  layouts = eva_optax.layouts_of(jax.eval_shape(grad_fn, params, xs[0], ys[0])[2])
  assert layouts["Conv_1"] == KernelLayout(1, 1, groups=4)
  assert layouts["Einsum_0"].permutation == layouts["Einsum_1"].permutation == (1, 0, 2)
  kw = dict(inverse_every=2) if name in ("foof", "kfac") else {}
  results = []
  for given in (None, layouts):
    tx = alias(0.05, layouts=given, **kw)
    state, p = tx.init(params), params
    if given is None:
      for module in ("Conv_0", "Conv_1", "Einsum_0", "Einsum_1"):
        for field in statistics:
          assert getattr(state[0], field)[module].ndim == 1, (module, field)
      dense = getattr(state[0], statistics[0])["Dense_0"]  # A: its rows and its bias row
      assert (dense.rows.ndim == 2) if name in ("foof", "kfac") else (dense.ndim == 1)

    @jax.jit
    def step(p, s, x, y):
      _, grads, stats = grad_fn(p, x, y)
      updates, s = tx.update(grads, s, p, stats=stats)
      return optax.apply_updates(p, updates), s

    for x, y in zip(xs, ys):
      p, state = step(p, state, x, y)
    results.append(p)
  free, exact = results
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), free, exact)
  moved = jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()), free, params)
  assert min(jax.tree.leaves(moved)) > 0


def test_a_layout_without_room_is_a_clear_error():
  """A grouped conv with several input channels per group (not depthwise): the
  parameters look like an ordinary conv and the state has room for that only,
  so the update says to pass layouts=, and with them it trains."""
  model = nn.Conv(4, (3, 3), feature_group_count=2, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
  params = model.init(jax.random.key(1), x)["params"]
  loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params)
  tx = eva_optax.eva(0.1)
  with pytest.raises(ValueError, match="layouts=eva_optax.layouts_of"):
    tx.update(grads, tx.init(params), params, stats=stats)
  tx = eva_optax.eva(0.1, layouts=eva_optax.layouts_of(stats))
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  assert float(jnp.abs(updates["kernel"]).max()) > 0


def test_room_is_exact_where_the_parameters_fix_the_layout_and_flat_where_not():
  """A Dense kernel (4, 3) has one reading: exact shapes. A bias-free kernel
  (4, 3, 5) has several (in 4·3 out 5; in 4 out 3·5; stack 4, in 3, out 5; and
  the Einsum readings contracting 3 or 5): each statistic gets a flat buffer as
  long as its largest reading; fit reads its head, put writes it, tail zero."""
  slots = find_layer_slots(
    {
      "dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
      "open": {"kernel": jnp.zeros((4, 3, 5))},
    }
  )
  assert state_entries.entry_shapes(slots[("dense",)], EVA_STATISTICS) == {
    "input_mean": (4,),
    "output_grad_mean": (3,),
  }
  # ā: 12, 4, 4·3, 3, 5 → 12; ḡ: 5, 15, 4·5, 4·5, 3·4 → 20.
  assert state_entries.entry_shapes(slots[("open",)], EVA_STATISTICS) == {
    "input_mean": (12,),
    "output_grad_mean": (20,),
  }
  open_slot = slots[("open",)]
  assert state_entries.holds_layout(open_slot, KernelLayout(0, 2), EVA_STATISTICS)
  assert state_entries.holds_layout(open_slot, KernelLayout(1, 1), EVA_STATISTICS)
  # Contracting 3 and 5 (ā of 15) is not a reading of Flax's layers.
  assert not state_entries.holds_layout(
    open_slot, KernelLayout(0, 1, permutation=(1, 2, 0)), EVA_STATISTICS
  )
  value = jnp.arange(1.0, 16.0).reshape(3, 5)
  new = state_entries.write_entry(jnp.ones(20), value)
  np.testing.assert_array_equal(new, np.r_[np.arange(1.0, 16.0), np.zeros(5)])
  np.testing.assert_array_equal(state_entries.read_entry(new, (3, 5), "open"), value)
  with pytest.raises(ValueError, match="layouts=eva_optax.layouts_of"):
    state_entries.read_entry(new, (3, 7), "open")


def test_a_rule_whose_state_class_lacks_a_field_is_a_clear_error():
  """The skeleton builds the state positionally: a class without the gate of a
  factor statistic (or with fields in another order) is refused when the
  transformation is made, naming the fields it needs."""

  class NoGate(NamedTuple):
    count: Any
    input_factor: Any

  rule = layerwise_rule.LayerwiseRule(
    "scale_by_test", ("input_factor",), lambda g, c, gamma: None, NoGate
  )
  options = preconditioning.LayerwiseOptions(None, 0.03, 0.001, 0.05, "kl_normalise")
  with pytest.raises(TypeError, match=r"\('count', 'input_factor', 'gate'\)"):
    preconditioning.layerwise_transformation(rule, options)
  fine = rule._replace(
    statistics=("input_mean",), state=NamedTuple("S", [("count", Any), ("input_mean", Any)])
  )
  assert preconditioning.layerwise_transformation(fine, options).init({}).count == 0
