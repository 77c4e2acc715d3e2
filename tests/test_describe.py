"""``eva_optax.describe``: one row per parameter, preconditioned or passed through, and why."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax._src.statistics import KernelLayout, LayerStats, PassThrough


def _params_and_stats():
  params = {
    "Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
    "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
    "blocks": {"up": {"kernel": jnp.zeros((2, 3, 5))}},
    "grouped": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)},
    "unused": {"kernel": jnp.zeros((3, 3))},
  }
  stats = {
    "Dense_0": LayerStats(jnp.ones(4), jnp.ones(3), kind="Dense"),
    "blocks": {
      "up": LayerStats(
        jnp.ones((2, 3)), jnp.ones((2, 5)), layout=KernelLayout(1, 1), has_bias=False
      )
    },
    "grouped": PassThrough("Conv", "feature_group_count=2: grouped convolution"),
  }
  return params, stats


def test_one_row_per_parameter_with_its_rule():
  params, stats = _params_and_stats()
  rows = eva_optax.describe(params, stats, layouts={"blocks": {"up": KernelLayout(1, 1)}})
  by_name = {r.parameter: r for r in rows}
  assert len(rows) == len(by_name) == 8  # every leaf of params, once
  assert {name: r.rule for name, r in by_name.items()} == {
    "Dense_0/bias": "preconditioned",
    "Dense_0/kernel": "preconditioned",
    "LayerNorm_0/bias": "pass-through",
    "LayerNorm_0/scale": "pass-through",
    "blocks/up/kernel": "preconditioned",
    "grouped/bias": "pass-through",
    "grouped/kernel": "pass-through",
    "unused/kernel": "pass-through",
  }
  assert by_name["Dense_0/kernel"].shape == (4, 3)
  assert by_name["Dense_0/kernel"].detail.startswith("Dense: in 4 + bias, out 3")
  assert by_name["blocks/up/kernel"].detail.startswith("Dense: in 3, out 5, stack (2,)")
  assert by_name["LayerNorm_0/scale"].detail == "not part of a Dense/DenseGeneral/Conv/Einsum layer"
  assert by_name["unused/kernel"].detail.startswith("no statistics captured for this kernel")


def test_pass_through_reason_is_shown():
  params, stats = _params_and_stats()
  rows = eva_optax.describe(params, stats, layouts={"blocks": {"up": KernelLayout(1, 1)}})
  grouped = [r for r in rows if r.parameter.startswith("grouped/")]
  assert len(grouped) == 2
  for row in grouped:
    assert row.rule == "pass-through"
    assert row.detail == "Conv: feature_group_count=2: grouped convolution"
  text = str(rows)
  assert "Conv: feature_group_count=2: grouped convolution" in text
  assert text.splitlines()[-1] == "3 of 8 parameters preconditioned"


def test_layer_whose_eva_correction_vanishes_is_flagged():
  """ρ = s/(γ + s) with s = ‖ā‖²‖ḡ‖²: ḡ of size 1e-6 gives s = 4·3e-12 ≪ γ, so the
  row says ḡ ≈ 0 and what Eva reduces to; the same layer with ḡ of size 1 does not."""
  params = {"Conv_0": {"kernel": jnp.zeros((1, 1, 4, 3))}}
  for size, flagged in ((1e-6, True), (1.0, False)):
    stats = {"Conv_0": LayerStats(jnp.ones(4), size * jnp.ones(3), kind="Conv", has_bias=False)}
    (row,) = eva_optax.describe(params, stats)
    assert row.rule == "preconditioned"
    assert ("ḡ ≈ 0" in row.detail) is flagged
    if flagged:
      assert "‖ā‖²‖ḡ‖² = 1.2e-11" in row.detail and "gradient / γ" in row.detail
  # The threshold is on ρ: with γ = 1e-12 the same statistics are not negligible.
  stats = {"Conv_0": LayerStats(jnp.ones(4), 1e-6 * jnp.ones(3), kind="Conv", has_bias=False)}
  (row,) = eva_optax.describe(params, stats, damping=1e-12)
  assert "≈ 0" not in row.detail


def test_layer_whose_layout_the_parameters_leave_open_says_where_it_comes_from():
  """A bias-free DenseGeneral with two output axes: the shapes suggest in 4·3,
  out 5; the capture recorded in 4, out 3·5, which the state has room for: the
  row says the layout comes from the capture. A conv kernel (3, 3, 4, 8) of
  2 groups of 4 input channels has no such room (only depthwise convs have
  it): the row names layouts=; with those layouts given, neither row does."""
  params = {
    "q": {"kernel": jnp.zeros((4, 3, 5))},
    "grouped": {"kernel": jnp.zeros((3, 3, 4, 8))},
  }
  stats = {
    "q": LayerStats(
      jnp.ones(4), jnp.ones(15), kind="DenseGeneral", layout=KernelLayout(0, 2), has_bias=False
    ),
    "grouped": LayerStats(
      jnp.ones((2, 36)),
      jnp.ones((2, 4)),
      kind="Conv",
      layout=KernelLayout(1, 1, groups=2),
      has_bias=False,
    ),
  }
  rows = {r.parameter: r for r in eva_optax.describe(params, stats)}
  q, grouped = rows["q/kernel"], rows["grouped/kernel"]
  assert "layout from the capture" in q.detail
  assert "layouts=" not in q.detail and "in 4, out 15" in q.detail
  assert "layouts=eva_optax.layouts_of(stats)" in grouped.detail
  for row in eva_optax.describe(params, stats, layouts=eva_optax.layouts_of(stats)):
    assert "layouts=" not in row.detail and "from the capture" not in row.detail


def _two_layer_run(tx, batches):
  """``small`` (3 → 4, no bias) fed inputs of size 1e-4, then ``big`` (4 → 2, bias), MSE;
  ``tx`` updated once per batch. Returns the parameters and the state."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="big")(nn.Dense(4, use_bias=False, name="small")(x))

  net = Net()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))["params"]
  loss_fn = lambda p, x, y: jnp.mean(jnp.square(net.apply({"params": p}, x) - y))
  grad_fn = eva_optax.value_and_grad(
    loss_fn, statistics=eva_optax.statistics_needed(tx.init(params))
  )
  state = tx.init(params)

  @jax.jit
  def step(state, x, y):
    _, grads, stats = grad_fn(params, x, y)
    return tx.update(grads, state, params, stats=stats)[1]

  for x, y in batches:
    state = step(state, x, y)
  return params, state


def _numpy_means(params, batches, decay):
  """ā and ḡ (the batch mean of g, the gradient of the mean loss) of both layers by hand
  (float64), averaged as the rules do:
  m ← decay·m + (1 − decay)·new, the first batch taken as it is."""
  w1 = np.asarray(params["small"]["kernel"], np.float64)
  w2 = np.asarray(params["big"]["kernel"], np.float64)
  b2 = np.asarray(params["big"]["bias"], np.float64)
  running = None
  for x, y in batches:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = x @ w1
    d_out = 2 * (h @ w2 + b2 - y) / y.size  # g: ∂ mean((out − y)²) / ∂out, per sample
    new = {
      "small": (x.mean(0), (d_out @ w2.T).mean(0)),
      "big": (h.mean(0), d_out.mean(0)),
    }
    running = (
      new
      if running is None
      else {k: tuple(decay * m + (1 - decay) * n for m, n in zip(running[k], new[k])) for k in new}
    )
  return running


@pytest.mark.usefixtures("quick_compiles")
def test_negligible_fraction_from_the_running_averages_matches_numpy():
  """Two batches averaged with stat_decay 0.5. ``small``: ‖ā‖² ~ 1e-8, no bias, so Eva's
  s = ‖ā‖²‖ḡ‖² and Eva-f's ‖ā‖² are ≪ γ: negligible; ``big`` has a bias, â = [ā, 1]:
  ρ ≈ ‖ḡ‖²/(‖ḡ‖² + γ) for Eva, ≥ 1/(1 + γ) for Eva-f: not negligible. ρ of each layer
  equals the numpy value; 1 of 2 layers and 12 of 22 parameters are negligible."""
  rng = np.random.default_rng(0)
  batches = [
    (
      jnp.asarray(1e-4 * (rng.standard_normal((8, 3)) + 1.0), jnp.float32),
      jnp.asarray(rng.standard_normal((8, 2)) + 1.0, jnp.float32),
    )
    for _ in range(2)
  ]
  gamma = 0.03
  for tx, rule in (
    (eva_optax.scale_by_eva(1.0, stat_decay=0.5, damping=gamma), "eva"),
    (optax.chain(eva_optax.scale_by_eva_foof(stat_decay=0.5), optax.adamw(1e-3)), "eva-f"),
  ):
    params, state = _two_layer_run(tx, batches)
    means = _numpy_means(params, batches, 0.5)
    found = eva_optax.negligible_fraction(params, state, damping=gamma)
    assert found.rules == (rule,)
    for name, bias in (("small", 0.0), ("big", 1.0)):
      a, g = means[name]
      s = (a @ a + bias) * (g @ g if rule == "eva" else 1.0)
      np.testing.assert_allclose(found.ratios[name], s / (s + gamma), rtol=1e-4)
    assert found.ratios["small"] < 1e-5 and found.ratios["big"] > 0.5
    assert (found.layers, found.negligible_layers) == (2, 1)
    assert (found.parameters, found.negligible_parameters) == (3 * 4 + 4 * 2 + 2, 12)
    assert found.of_layers == 0.5 and found.of_parameters == 12 / 22


def test_negligible_fraction_counts_each_layer_of_a_stack_and_reads_flat_buffers():
  """A stack of 2 bias-free layers (3 → 5): the state keeps ā and ḡ in flat buffers
  (the shapes leave the layout open), so ``layouts=`` is needed to read them; the first
  layer's ḡ of 1e-4 gives s = 3·5e-8 ≪ γ, the second's ḡ of 1 does not: 1 of 2 layers,
  15 of 30 parameters. The damping schedule is read at the last update's step. Optimizers
  without a rank-one correction give ``None``."""
  params = {"blocks": {"up": {"kernel": jnp.zeros((2, 3, 5))}}}
  layouts = {"blocks": {"up": KernelLayout(1, 1)}}
  a = np.ones((2, 3))
  g = np.stack([1e-4 * np.ones(5), np.ones(5)])
  stored = lambda v: {"blocks": {"up": jnp.asarray(v.reshape(-1))}}
  state = eva_optax.scale_by_eva(1.0).init(params)
  assert state.input_mean["blocks"]["up"].shape == (6,)  # flat: the layout is open
  state = state._replace(count=jnp.asarray(3), input_mean=stored(a), output_grad_mean=stored(g))
  with pytest.raises(ValueError, match="layout open.*flat buffer.*layouts="):
    eva_optax.negligible_fraction(params, state)
  found = eva_optax.negligible_fraction(params, state, layouts=layouts)
  np.testing.assert_allclose(found.ratios["blocks/up"], [1.5e-7 / (1.5e-7 + 0.03), 15 / 15.03])
  assert (found.layers, found.negligible_layers, found.parameters) == (2, 1, 30)
  assert found.negligible_parameters == 15
  # γ at step count − 1 = 2: huge there (every layer negligible), tiny elsewhere.
  schedule = lambda step: 1e9 if step == 2 else 1e-30
  assert (
    eva_optax.negligible_fraction(params, state, layouts=layouts, damping=schedule).of_layers == 1
  )
  kfac = eva_optax.kfac(0.1).init({"up": {"kernel": jnp.zeros((3, 5))}})
  assert eva_optax.negligible_fraction({"up": {"kernel": jnp.zeros((3, 5))}}, kfac) is None


def test_describe_counts_the_bias_in_the_rank_one_direction():
  """Eva's ‖â‖² = ‖ā‖² + 1 with a bias: ā = 0 and ḡ of size 1 leave s = ‖ḡ‖² = 3, not 0,
  so describe does not flag the layer; without the bias it does (ā ≈ 0)."""
  params = {"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  for has_bias, flagged in ((True, False), (False, True)):
    stats = {"Dense_0": LayerStats(jnp.zeros(4), jnp.ones(3), kind="Dense", has_bias=has_bias)}
    row = next(r for r in eva_optax.describe(params, stats) if r.parameter == "Dense_0/kernel")
    assert ("ā ≈ 0" in row.detail) is flagged
