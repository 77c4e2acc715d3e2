"""``layer_labels`` (``eva_optax._src.labels``) and what an optimizer state asks of the
capture (``eva_optax._src.state_needs``): ``statistics_needed`` and ``has_factor_gate``."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax

pytestmark = [
  pytest.mark.filterwarnings("ignore::eva_optax.PassThroughWarning"),
  pytest.mark.usefixtures("quick_compiles"),
]


class EmbedNormMLP(nn.Module):
  """An embedding, a LayerNorm and a ConvTranspose (passed through) among two Dense layers."""

  @nn.compact
  def __call__(self, ids):
    h = nn.tanh(nn.Dense(5)(nn.Embed(7, 6)(ids)))  # Embed_0, Dense_0
    h = nn.ConvTranspose(4, kernel_size=(1,))(nn.LayerNorm()(h))  # LayerNorm_0, ConvTranspose_0
    return nn.Dense(7, use_bias=False)(h)  # Dense_1


@pytest.fixture(scope="module")
def problem():
  """Parameters and, for two batches, gradients and statistics."""
  model = EmbedNormMLP()
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 7, size=(8, 3)), jnp.int32) for _ in range(2)]
  params = model.init(jax.random.PRNGKey(0), batches[0])["params"]

  def loss_fn(p, ids):
    logits = model.apply({"params": p}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn))
  steps = [grad_fn(params, ids)[1:] for ids in batches]
  return params, steps


LAYERS = {"Dense_0": ("kernel", "bias"), "Dense_1": ("kernel",)}
OUTSIDE = {"Embed_0": ("embedding",), "LayerNorm_0": ("scale", "bias")}
PASSED = {"ConvTranspose_0": ("kernel", "bias")}  # a kernel of rank 3 the capture passes through


def _leaves(groups):
  return [(m, n) for m, names in groups.items() for n in names]


def test_layer_labels_are_the_parameters_eva_preconditions(problem):
  params, [(_, stats), _] = problem
  labels = eva_optax.layer_labels(params, stats)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert {(m, n): labels[m][n] for m, n in _leaves(LAYERS)} == dict.fromkeys(
    _leaves(LAYERS), "layer"
  )
  assert {labels[m][n] for m, n in _leaves(OUTSIDE) + _leaves(PASSED)} == {"outside"}
  # Leaf by leaf what describe reports (the same order: the leaves of params).
  rows = eva_optax.describe(params, stats)
  assert jax.tree.leaves(labels) == [
    "layer" if r.rule == "preconditioned" else "outside" for r in rows
  ]
  # Without the statistics, the parameters alone: a module owning a kernel of rank ≥ 2.
  by_params = eva_optax.layer_labels(params)
  assert {by_params[m][n] for m, n in _leaves(LAYERS) + _leaves(PASSED)} == {"layer"}
  assert {by_params[m][n] for m, n in _leaves(OUTSIDE)} == {"outside"}
  # A kernel of rank 1 is not a layer; nor is a module's leaf other than kernel and bias.
  odd = {"norm": {"kernel": jnp.ones(3)}, "dense": {"kernel": jnp.ones((2, 3)), "gate": 1.0}}
  assert eva_optax.layer_labels(odd) == {
    "norm": {"kernel": "outside"},
    "dense": {"kernel": "layer", "gate": "outside"},
  }


@pytest.mark.parametrize("with_stats", [False, True], ids=["by_params", "by_stats"])
def test_partition_on_the_labels_is_eva_on_the_layers_and_adamw_elsewhere(problem, with_stats):
  """``optax.partition({'layer': eva, 'outside': adamw}, layer_labels)``: the layers move as
  under Eva alone (its KL clip sums over its layers only), the other parameters as under
  AdamW alone. A module the capture passed through goes to Eva by the parameters' labels
  (Eva returns its gradient unchanged) and to AdamW by the statistics' labels."""
  params, steps = problem
  stats = steps[0][1]
  labels = functools.partial(eva_optax.layer_labels, stats=stats) if with_stats else None
  make_eva = lambda: eva_optax.eva(0.1, momentum=0.9, weight_decay=1e-3)  # noqa: E731
  make_adamw = lambda: optax.adamw(1e-2, weight_decay=1e-2)  # noqa: E731
  tx = optax.partition(
    {"layer": make_eva(), "outside": make_adamw()}, labels or eva_optax.layer_labels
  )
  eva, adamw = make_eva(), make_adamw()
  state, eva_state, adamw_state = tx.init(params), eva.init(params), adamw.init(params)
  to_eva = _leaves(LAYERS) + ([] if with_stats else _leaves(PASSED))
  to_adamw = _leaves(OUTSIDE) + (_leaves(PASSED) if with_stats else [])
  update, eva_update, adamw_update = (jax.jit(t.update) for t in (tx, eva, adamw))
  for grads, stats in steps:  # two batches: momentum and the running averages move on
    updates, state = update(grads, state, params, stats=stats)
    by_eva, eva_state = eva_update(grads, eva_state, params, stats=stats)
    by_adamw, adamw_state = adamw_update(grads, adamw_state, params)
    for m, n in to_eva:
      np.testing.assert_allclose(updates[m][n], by_eva[m][n], rtol=1e-6, atol=1e-9)
    for m, n in to_adamw:
      np.testing.assert_allclose(updates[m][n], by_adamw[m][n], rtol=1e-6, atol=1e-9)
  # The two optimizers do move the parameters differently, so the labels decide.
  for m, n in _leaves(LAYERS) + _leaves(OUTSIDE) + _leaves(PASSED):
    assert not np.allclose(by_eva[m][n], by_adamw[m][n], rtol=1e-2), (m, n)


def test_statistics_needed_and_the_factor_gate_are_read_from_any_state(problem):
  params, _ = problem
  eva_stats, kfac_stats = ("input_mean", "output_grad_mean"), ("input_factor", "output_grad_factor")
  cases = [
    (optax.adamw(0.1), (), False),
    (eva_optax.eva_shampoo(0.1), (), False),
    (eva_optax.eva(0.1), eva_stats, False),
    (eva_optax.eva_foof(0.1), ("input_mean",), False),
    (eva_optax.kfac(0.1), kfac_stats, True),
    (eva_optax.foof(0.1), ("input_factor",), True),
    (optax.chain(optax.clip(1.0), eva_optax.scale_by_eva(0.1)), eva_stats, False),
    (optax.inject_hyperparams(eva_optax.kfac)(learning_rate=0.1), kfac_stats, True),
    (optax.MultiSteps(eva_optax.foof(0.1), every_k_schedule=2), ("input_factor",), True),
    # Side by side: the union, in eva_optax's order.
    (
      optax.partition(
        {"layer": eva_optax.foof(0.1), "outside": eva_optax.eva(0.1)}, eva_optax.layer_labels
      ),
      ("input_mean", "output_grad_mean", "input_factor"),
      True,
    ),
  ]
  for tx, needed, gated in cases:
    state = jax.eval_shape(tx.init, params)  # the structure is all they read
    assert eva_optax.statistics_needed(state) == needed, tx
    assert eva_optax.has_factor_gate(state) is gated, tx
  # Inside jit, from the traced state: what a step reads when it is traced.
  tx = optax.partition(
    {"layer": eva_optax.eva(0.1), "outside": optax.sgd(0.1)}, eva_optax.layer_labels
  )
  seen = []
  jax.jit(lambda s: seen.append(eva_optax.statistics_needed(s)) or 0)(tx.init(params))
  assert seen == [eva_stats]
  # Where has_factor_gate says so, factors_due reads the gate; elsewhere it raises.
  assert bool(eva_optax.factors_due(eva_optax.kfac(0.1, stats_every=3).init(params)))
  with pytest.raises(ValueError, match="no optimizer that averages factors"):
    eva_optax.factors_due(optax.adamw(0.1).init(params))  # what has_factor_gate spares
