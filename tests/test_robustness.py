"""Robustness across every optimizer: bad hyperparameters are refused by name,
updates stay finite on degenerate statistics (zero inputs, dead ReLUs, huge and
tiny losses), dtypes come back as given (float64, bfloat16, float16), and
statistics that do not fit the parameters or are not finite never corrupt the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from models import TwoLayerMLP

ALIASES = {
  "eva": eva_optax.eva,
  "eva_foof": eva_optax.eva_foof,
  "eva_shampoo": eva_optax.eva_shampoo,
  "kfac": eva_optax.kfac,
  "foof": eva_optax.foof,
  "shampoo": eva_optax.shampoo,
}
STATISTICS = {
  "eva": eva_optax.EVA_STATISTICS,
  "eva_foof": eva_optax.EVA_FOOF_STATISTICS,
  "eva_shampoo": None,
  "kfac": eva_optax.KFAC_STATISTICS,
  "foof": eva_optax.FOOF_STATISTICS,
  "shampoo": None,
}

BAD = [
  ("damping", 0.0, "damping"),
  ("damping", -1e-3, "damping"),
  ("momentum", 1.0, "momentum"),
  ("momentum", -0.1, "momentum"),
  ("stat_decay", 1.5, "stat_decay"),
  ("stat_decay", -0.1, "stat_decay"),
  ("weight_decay", -1.0, "weight_decay"),
  ("learning_rate", "fast", "learning_rate"),
  ("learning_rate", float("nan"), "learning_rate"),
]
PERIODS = {
  "kfac": ("inverse_every", "stats_every"),
  "foof": ("inverse_every", "stats_every"),
  "shampoo": ("inverse_every", "block_size"),
}


def _cases():
  for name in ALIASES:
    for arg, value, word in BAD:
      yield name, arg, value, word
    if name not in ("eva_shampoo", "shampoo"):
      yield name, "kl_clip", -1.0, "kl_clip"
    for arg in PERIODS.get(name, ()):
      yield name, arg, 0, arg
      yield name, arg, 2.5, arg


@pytest.mark.parametrize("name, arg, value, word", list(_cases()))
def test_bad_hyperparameter_names_itself(name, arg, value, word):
  kwargs = {"learning_rate": 0.1, arg: value}
  with pytest.raises(ValueError, match=word):
    ALIASES[name](**kwargs)


def test_error_message_gives_the_range():
  with pytest.raises(ValueError, match=r"momentum must be finite and in \[0.0, 1.0\); got 1.0"):
    eva_optax.eva(0.1, momentum=1.0)


# ---------------------------------------------------------------------------
# Numerics.


def _step(name, model, params, x, y, tx=None):
  tx = tx or ALIASES[name](0.1, **({"inverse_every": 1} if name in PERIODS else {}))
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x).astype(jnp.float32) - y) ** 2)
  statistics = STATISTICS[name]
  if statistics is None:
    grads, kw = jax.grad(loss_fn)(params), {}
  else:
    _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=statistics)(params)
    kw = {"stats": stats}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, **kw)
  return updates, state


def _finite(tree):
  return all(
    bool(jnp.all(jnp.isfinite(leaf)))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
  )


@pytest.mark.parametrize("name", sorted(ALIASES))
@pytest.mark.parametrize("case", ["zero_inputs", "dead_relu", "huge", "tiny"])
def test_updates_finite_on_degenerate_statistics(name, case):
  model = TwoLayerMLP()
  x = jnp.ones((4, 5))
  params = model.init(jax.random.key(0), x)["params"]
  y = jnp.zeros((4, 3))
  if case == "zero_inputs":
    x = jnp.zeros_like(x)
  elif case == "dead_relu":
    params["Dense_0"]["bias"] = jnp.full_like(params["Dense_0"]["bias"], -100.0)
  elif case == "huge":
    y = jnp.full((4, 3), 1e15)
  elif case == "tiny":
    y = jnp.asarray(model.apply({"params": params}, x)) + 1e-20
  updates, state = _step(name, model, params, x, y)
  assert _finite(updates) and _finite(state)


@pytest.mark.parametrize("name", ["eva", "kfac", "eva_shampoo"])
def test_float64(name):
  with jax.enable_x64(True):
    model = TwoLayerMLP(dtype=jnp.float64)
    x = jnp.ones((4, 5), jnp.float64)
    params = model.init(jax.random.key(0), x)["params"]
    updates, state = _step(name, model, params, x, jnp.zeros((4, 3)))
    assert _finite(updates)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_low_precision_params(name, dtype):
  """bf16/f16 parameters and activations: statistics in float32, updates in the
  parameters' dtype, close to the float32 run's updates."""
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jax.random.normal(jax.random.key(2), (16, 3))
  params32 = TwoLayerMLP().init(jax.random.key(0), x)["params"]
  low = jax.tree.map(lambda p: p.astype(dtype), params32)
  updates, state = _step(name, TwoLayerMLP(dtype=dtype), low, x.astype(dtype), y)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 1 and leaf.dtype != dtype:
      assert leaf.dtype == jnp.float32
  ref, _ = _step(name, TwoLayerMLP(), params32, x, y)
  for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
    scale = float(jnp.abs(r).max()) + 1e-12
    assert float(jnp.abs(u.astype(jnp.float32) - r).max()) < 0.1 * scale
  if STATISTICS[name] is not None:
    loss_fn = lambda p: jnp.mean(
      (TwoLayerMLP(dtype=dtype).apply({"params": p}, x.astype(dtype)).astype(jnp.float32) - y) ** 2
    )
    _, _, stats = eva_optax.value_and_grad(loss_fn, statistics=STATISTICS[name])(low)
    for leaf in jax.tree.leaves(stats):
      assert leaf.dtype == jnp.float32


def _mlp_problem():
  model = TwoLayerMLP()
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jax.random.normal(jax.random.key(2), (16, 3))
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return params, loss_fn, x


def test_stats_for_a_path_without_parameters_is_an_error():
  params, loss_fn, x = _mlp_problem()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x)
  stats = {**stats, "Decoder": stats["Dense_0"]}
  tx = eva_optax.eva(0.1)
  with pytest.raises(ValueError, match=r"statistics for \['Decoder'\].*no parameters there"):
    tx.update(grads, tx.init(params), params, stats=stats)


@pytest.mark.parametrize("name", ["eva", "kfac", "foof", "eva_foof"])
def test_non_finite_statistics_never_enter_the_averages(name):
  params, loss_fn, x = _mlp_problem()
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=STATISTICS[name])
  tx = ALIASES[name](0.1)
  state = tx.init(params)
  _, grads, stats = grad_fn(params, x)
  _, state = tx.update(grads, state, params, stats=stats)
  # Statistics of a step that overflowed: NaN in one layer's vectors, Inf in the other's.
  poison = {"Dense_0": jnp.nan, "Dense_1": jnp.inf}
  bad_stats = {k: jax.tree.map(lambda a: a * poison[k], v) for k, v in stats.items()}
  assert not _finite(bad_stats)
  _, after = tx.update(grads, state, params, stats=bad_stats)
  for field in STATISTICS[name]:
    jax.tree.map(np.testing.assert_array_equal, getattr(after[0], field), getattr(state[0], field))
  # And the next finite step proceeds from the averages kept.
  _, again = tx.update(grads, after, params, stats=stats)
  assert _finite(again)
