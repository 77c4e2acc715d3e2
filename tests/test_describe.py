"""``eva_optax.describe``: one row per parameter, preconditioned or passed through, and why."""

import jax.numpy as jnp

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
