"""The peers of the harness's registry: Muon (AdamW for the non-matrix parameters) and
Sophia (its Hessian estimate fed by the step's ``obj_fn``), numbers checked by hand."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples.harness import training
from examples.harness.optimizers import SPEC_BY_KEY, Options, plain_labels

pytestmark = pytest.mark.usefixtures("quick_compiles")


def _params_and_grads():
  rng = np.random.default_rng(0)
  # A kernel gradient with singular values 1, 0.1, 0.01: far from orthogonal.
  u, _ = np.linalg.qr(rng.standard_normal((4, 3)))
  v, _ = np.linalg.qr(rng.standard_normal((3, 3)))
  kernel_grad = (u * np.array([1.0, 0.1, 0.01])) @ v.T  # (in 4, out 3)
  params = {"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  grads = {
    "Dense_0": {
      "kernel": jnp.asarray(kernel_grad, jnp.float32),
      "bias": jnp.asarray([0.5, -2.0, 1e-3], jnp.float32),
    }
  }
  return params, grads


def test_muon_orthogonalises_kernels_and_gives_other_parameters_adamw():
  params, grads = _params_and_grads()
  tx = SPEC_BY_KEY["muon"].build(0.1, Options(momentum=0.95, weight_decay=0.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  # The bias: AdamW's first step (Nesterov, no decay), as optax.contrib.muon documents.
  adamw = optax.adamw(0.1, weight_decay=0.0, nesterov=True)
  expected, _ = adamw.update(
    grads["Dense_0"]["bias"], adamw.init(params["Dense_0"]["bias"]), params["Dense_0"]["bias"]
  )
  np.testing.assert_allclose(updates["Dense_0"]["bias"], expected, rtol=1e-5)
  # The kernel: Newton-Schulz flattens the singular values (100 apart in the gradient).
  s = np.linalg.svd(np.asarray(updates["Dense_0"]["kernel"]), compute_uv=False)
  g = np.linalg.svd(np.asarray(grads["Dense_0"]["kernel"]), compute_uv=False)
  assert g[0] / g[-1] == pytest.approx(100.0, rel=1e-3)
  assert s[0] / s[-1] < 2.0
  # Same directions as the gradient's singular vectors (descent on each).
  assert float(jnp.sum(updates["Dense_0"]["kernel"] * grads["Dense_0"]["kernel"])) < 0


def _sophia_state(state):
  is_sophia = lambda node: isinstance(node, optax.contrib.SophiaState)
  return next(n for n in jax.tree.leaves(state, is_leaf=is_sophia) if is_sophia(n))


def test_sophia_gets_the_batch_loss_from_the_step_and_estimates_the_hessian():
  model = nn.Dense(1)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((16, 3)).astype(np.float32)
  y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype(np.float32)

  def loss_fn(params, model_state, batch):
    inputs, targets = batch
    loss = jnp.mean(jnp.square(model.apply({"params": params}, inputs) - targets))
    return loss, (model_state, {})

  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  spec = SPEC_BY_KEY["sophia"]
  tx = spec.build(0.01, Options(momentum=0.9, weight_decay=0.0))
  with pytest.raises(ValueError, match="obj_fn"):  # Sophia cannot run without it
    tx.update(params, tx.init(params), params)
  step = training.make_step(spec, tx, loss_fn)
  state = tx.init(params)
  p, _, state, loss, _ = step(params, {}, state, (x, y))
  # The Hessian of this loss in the bias is exactly 2 (d²/db² of mean (x·w + b - y)²),
  # and Hutchinson's z ⊙ Hz for it is 2 + 2 Σ_j mean(x_j) z_j z_b; the running average
  # after one update is (1 - b2) times that estimate.
  nu = _sophia_state(state).nu
  nu_bias = float(nu["bias"][0]) / (1 - 0.99)
  bound = 2 * float(np.abs(x.mean(axis=0)).sum())
  assert 2 - bound - 1e-4 <= nu_bias <= 2 + bound + 1e-4
  assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree.leaves(nu))
  # It trains: ten more steps lower the loss.
  first = float(loss)
  for _ in range(10):
    p, _, state, loss, _ = step(p, {}, state, (x, y))
  assert float(loss) < first


EVA, KFAC = ("input_mean", "output_grad_mean"), ("input_factor", "output_grad_factor")
# key -> (the statistics its step captures, whether gated by factors_due); None: jax's gradient.
CAPTURES = {
  "sgd": (None, False),
  "adamw": (None, False),
  "eva": (EVA, False),
  "eva-f": (("input_mean",), False),
  "eva-kln": (EVA, False),
  "eva-s": (None, False),
  "kfac": (KFAC, True),
  "kfac-authors": (KFAC, True),
  "foof": (("input_factor",), True),
  "shampoo": (None, False),
  "eva+adamw": (EVA, False),  # inside optax.chain, in front of AdamW
  "eva-f+adamw": (("input_mean",), False),
  "muon": (None, False),  # its statistics are for layouts= only
  "sophia": (None, False),
}


@pytest.mark.parametrize("passthrough_scale", [1.0, 2.0], ids=["alone", "in_a_partition"])
def test_the_step_captures_what_the_optimizer_state_asks_for(monkeypatch, passthrough_scale):
  """``make_step`` reads the capture from the optimizer's state (also inside the
  partition that ``passthrough_scale`` builds): the statistics its layer-wise parts
  average, ``factors_due`` where it holds a FactorGate, jax's gradient where it needs
  none; every update takes ``obj_fn`` (lowering would raise where one did not)."""
  assert set(CAPTURES) == set(SPEC_BY_KEY)
  model = nn.Dense(2)
  x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, model_state, batch):
    inputs, targets = batch
    return jnp.mean((model.apply({"params": params}, inputs) - targets) ** 2), (model_state, {})

  calls = []
  capture = training._grad_fn

  def spy(spec, loss_fn, statistics=None):
    grad_fn = capture(spec, loss_fn, statistics)

    def recorded(*args, **kwargs):
      calls.append((spec.key, statistics, tuple(kwargs)))
      return grad_fn(*args, **kwargs)

    return recorded

  monkeypatch.setattr(training, "_grad_fn", spy)
  options = Options(passthrough_scale=passthrough_scale)
  for key in CAPTURES:
    spec = SPEC_BY_KEY[key]
    tx = spec.build(0.1, options)
    if key not in ("sgd", "adamw") and passthrough_scale != 1.0:
      assert set(tx.init(params).inner_states) == {"preconditioned", "passthrough"}
    training.make_step(spec, tx, loss_fn).lower(params, {}, tx.init(params), (x, y))
  assert calls == [
    (key, statistics, ("factors_due",) if gated else ())
    for key, (statistics, gated) in CAPTURES.items()
    if statistics is not None
  ]


def test_authors_kfac_spec_captures_per_sample_factors_and_inverts_in_blocks():
  """'kfac-authors' is K-FAC on factor_rows='samples' statistics with 4-block
  inverses; 'kfac' keeps the textbook factors, so their first steps differ."""
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jax.random.normal(jax.random.key(1), (8, 3))
  params = model.init(jax.random.key(2), x)["params"]
  loss_fn = lambda p: (jnp.mean((model.apply({"params": p}, x) - y) ** 2), None)
  updates = {}
  for key in ("kfac", "kfac-authors"):
    spec = SPEC_BY_KEY[key]
    (_, _), grads, stats = training._grad_fn(spec, loss_fn)(params)
    assert stats.factor_rows == ("samples" if key == "kfac-authors" else "positions")
    tx = spec.build(0.1, Options())
    updates[key], _ = tx.update(grads, tx.init(params), params, stats=stats)
  assert dict(SPEC_BY_KEY["kfac-authors"].extra)["diag_blocks"] == 4
  assert not np.allclose(updates["kfac"]["kernel"], updates["kfac-authors"]["kernel"], rtol=1e-2)


@functools.cache
def _two_layer_problem(seed=2):
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  import eva_optax

  _, grads, stats = jax.jit(eva_optax.value_and_grad(loss))(params)
  return params, grads, stats


def test_plain_modules_get_sgd_and_the_others_eva():
  """The output-layer knob: ``plain_modules`` sends those layers to SGD (same momentum
  and weight decay), the rest to Eva, whose KL clip then sums over its own layers only."""
  import eva_optax

  params, grads, stats = _two_layer_problem()
  options = Options(momentum=0.9, weight_decay=1e-3, plain_modules=("layers_2",))
  tx = SPEC_BY_KEY["eva"].build(0.1, options)
  state = tx.init(params)
  for _ in range(2):  # the second step carries momentum
    updates, state = tx.update(grads, state, params, stats=stats)
  sgd = SPEC_BY_KEY["sgd"].build(0.1, options)
  s = sgd.init(params["layers_2"])
  for _ in range(2):
    expected_plain, s = sgd.update(grads["layers_2"], s, params["layers_2"])
  eva_alone = eva_optax.eva(0.1, momentum=0.9, weight_decay=1e-3)
  sub = {"layers_0": params["layers_0"]}
  e = eva_alone.init(sub)
  sub_stats = {"layers_0": stats["layers_0"]}
  for _ in range(2):
    expected_eva, e = eva_alone.update({"layers_0": grads["layers_0"]}, e, sub, stats=sub_stats)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(updates["layers_2"][name], expected_plain[name], rtol=1e-6)
    np.testing.assert_allclose(
      updates["layers_0"][name], expected_eva["layers_0"][name], rtol=1e-5, atol=1e-8
    )
  # Eva on both layers moves the first one differently (its KL clip sees both).
  both = eva_optax.eva(0.1, momentum=0.9, weight_decay=1e-3)
  b = both.init(params)
  for _ in range(2):
    together, b = both.update(grads, b, params, stats=stats)
  assert not np.allclose(together["layers_0"]["kernel"], updates["layers_0"]["kernel"])
  with pytest.raises(ValueError, match=r"plain_modules: no top-level module \['head'\]"):
    SPEC_BY_KEY["eva"].build(0.1, Options(plain_modules=("head",))).init(params)


def test_stat_decay_and_scaling_reach_eva_and_are_checked_by_name():
  import eva_optax

  params, grads, stats = _two_layer_problem()
  _, grads2, stats2 = _two_layer_problem(seed=3)  # another batch, other statistics
  steps = ((grads, stats), (grads2, stats2))

  def run(tx):
    state = tx.init(params)
    for g, st in steps:
      update, state = tx.update(g, state, params, stats=st)
    return update

  default = run(eva_optax.eva(0.1, momentum=0.9, weight_decay=5e-4, kl_clip=10.0))
  for options, kwargs in (
    (Options(kl_clip=10.0, stat_decay=0.5), {"stat_decay": 0.5}),
    (Options(scaling="kl_normalise"), {"scaling": "kl_normalise"}),
  ):
    got = run(SPEC_BY_KEY["eva"].build(0.1, options))
    want = run(
      eva_optax.eva(
        0.1, momentum=0.9, weight_decay=5e-4, kl_clip=options.kl_clip or 0.001, **kwargs
      )
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    # ... and the knob changes the step (the running averages, or the scaling).
    assert not np.allclose(
      got["layers_0"]["kernel"], default["layers_0"]["kernel"], rtol=1e-4, atol=0
    )
  with pytest.raises(ValueError, match="stat_decay"):
    SPEC_BY_KEY["eva"].build(0.1, Options(stat_decay=1.0))
  # SGD and AdamW take neither: the options leave them as they are.
  assert isinstance(
    SPEC_BY_KEY["sgd"].build(0.1, Options(stat_decay=0.5)), optax.GradientTransformation
  )


class _EmbedNormDense(nn.Module):
  """An embedding and a LayerNorm (passed through by Eva) around two Dense layers."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(7, 6)(ids)
    h = nn.LayerNorm()(nn.tanh(nn.Dense(5)(h)))
    return nn.Dense(7)(h)


@functools.cache
def _passthrough_problem():
  import eva_optax

  model = _EmbedNormDense()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 7, size=(8, 3)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, ids), ids
  ).mean()
  _, grads, stats = jax.jit(eva_optax.value_and_grad(loss))(params)
  return params, grads, stats


def test_passthrough_labels_are_the_parameters_eva_passes_through():
  import eva_optax

  params, _, stats = _passthrough_problem()
  labels = plain_labels(params, (), passthrough=True)
  rows = eva_optax.describe(params, stats)
  by_rule = ["passthrough" if r.rule == "pass-through" else r.rule for r in rows]
  assert jax.tree.leaves(labels) == by_rule
  assert labels["Embed_0"]["embedding"] == "passthrough"
  assert labels["LayerNorm_0"] == {"scale": "passthrough", "bias": "passthrough"}
  assert labels["Dense_0"] == {"kernel": "preconditioned", "bias": "preconditioned"}
  # plain_modules wins over the pass-through label
  assert plain_labels(params, ("LayerNorm_0",), passthrough=True)["LayerNorm_0"] == {
    "scale": "plain",
    "bias": "plain",
  }


@pytest.mark.parametrize("lr", [0.1, optax.linear_schedule(0.2, 0.0, 10)])
def test_passthrough_scale_gives_the_passed_through_parameters_sgd_at_that_multiple(lr):
  """Eva with passthrough_scale s: its layers move as Eva's alone, the embedding and the
  LayerNorm as SGD at s·η (same momentum and weight decay); s = 1 is Eva unchanged."""
  import eva_optax

  params, grads, stats = _passthrough_problem()
  options = Options(momentum=0.9, weight_decay=1e-3, passthrough_scale=30.0)
  tx = SPEC_BY_KEY["eva"].build(lr, options)
  eva_alone = eva_optax.eva(lr, momentum=0.9, weight_decay=1e-3)
  scaled = (lambda c: 30.0 * lr(c)) if callable(lr) else 30.0 * lr
  sgd = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(scaled, momentum=0.9))
  state, e, s = tx.init(params), eva_alone.init(params), sgd.init(params)
  for _ in range(3):  # momentum and the schedule move on
    updates, state = tx.update(grads, state, params, stats=stats)
    expected_eva, e = eva_alone.update(grads, e, params, stats=stats)
    expected_sgd, s = sgd.update(grads, s, params)
  for layer in ("Dense_0", "Dense_1"):
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(
        updates[layer][name], expected_eva[layer][name], rtol=1e-5, atol=1e-8
      )
  for layer, name in (("Embed_0", "embedding"), ("LayerNorm_0", "scale"), ("LayerNorm_0", "bias")):
    np.testing.assert_allclose(updates[layer][name], expected_sgd[layer][name], rtol=1e-6)
    # and that is 30× what Eva alone gives them
    np.testing.assert_allclose(
      updates[layer][name], 30.0 * expected_eva[layer][name], rtol=1e-5, atol=1e-8
    )
  same = SPEC_BY_KEY["eva"].build(0.1, Options(passthrough_scale=1.0))
  assert not isinstance(same.init(params), optax.PartitionState)
