"""Eva inside optax's wrappers: chain, partition, inject_hyperparams, MultiSteps, apply_if_finite.

Each test states what the wrapper does with Eva's extra argument ``stats=`` and
checks it against Eva run by hand on what the wrapper should feed it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from models import NormedMLP  # Dense_0, LayerNorm_0 (passed through), Dense_1, Dense_2

jax.config.update("jax_default_matmul_precision", "highest")

# The partition test: Eva on the last two layers, Adam on the first and the norm.
EVA_LAYERS = ("Dense_1", "Dense_2")
ADAM_LAYERS = ("Dense_0", "LayerNorm_0")


@pytest.fixture(scope="module")
def problem():
  model = NormedMLP()
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(3, 8, 2)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(2), xs[0])["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn))
  return params, loss_fn, grad_fn, xs, ys


def _close(a, b, rtol=1e-5):
  """Equal up to float32 rounding: rtol per entry, and rtol × the largest entry
  of the array for entries near zero (Sherman–Morrison subtracts)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    v = np.asarray(v)
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * float(np.abs(v).max(initial=0.0)))


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_diff(a, b):
  return max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _subset(tree, names):
  return {k: tree[k] for k in names}


# ---------------------------------------------------------------------------
# (a) chain(clip_by_global_norm, eva): Eva sees the clipped gradients.


@pytest.mark.parametrize("kl_clip", [1e6, 1e-3], ids=["kl_clip_inactive", "kl_clip_active"])
def test_clip_then_eva_equals_eva_of_clipped_gradients(problem, kl_clip):
  params, loss_fn, _, xs, ys = problem
  grad_fn = jax.jit(eva_optax.value_and_grad(lambda p, x, y: 50.0 * loss_fn(p, x, y)))
  eva = eva_optax.eva(0.05, kl_clip=kl_clip)
  chained = optax.chain(optax.clip_by_global_norm(1.0), eva)
  chain_update, eva_update = jax.jit(chained.update), jax.jit(eva.update)

  p, chain_state, eva_state = params, chained.init(params), eva.init(params)
  for i in range(3):
    _, grads, stats = grad_fn(p, xs[i], ys[i])
    norm = float(optax.tree.norm(grads))
    assert norm > 2.0, "the test needs gradients that get clipped"
    clipped = jax.tree.map(lambda g: g / norm, grads)  # by hand
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.0, rtol=1e-6)
    chain_updates, chain_state = chain_update(grads, chain_state, p, stats=stats)
    eva_updates, eva_state = eva_update(clipped, eva_state, p, stats=stats)
    _close(chain_updates, eva_updates)
    _close(chain_state[1], eva_state)
    if i == 0:
      # V is linear in the gradient. Without the KL clip (ν = 1) the first
      # update is the unclipped one divided by ‖g‖; with it, ν·V does not depend
      # on the gradient's scale, so the clipping is undone for the
      # preconditioned layers and only the pass-through LayerNorm sees it.
      raw, _ = eva_update(grads, eva.init(params), p, stats=stats)
      for name in raw:
        scaled = kl_clip > 1.0 or name == "LayerNorm_0"
        expected = jax.tree.map(lambda u: u / norm, raw[name]) if scaled else raw[name]
        _close(chain_updates[name], expected, rtol=1e-4)
    p = optax.apply_updates(p, chain_updates)


# ---------------------------------------------------------------------------
# (b) partition: Eva on some layers, Adam on the others.


@pytest.mark.parametrize("mask_compatible_extra_args", [False, True])
def test_partition_equals_each_optimizer_on_its_subset(problem, mask_compatible_extra_args):
  """optax.partition passes ``stats`` whole (unmasked) to every part; Adam
  drops it, Eva uses the statistics of its own layers and ignores the others
  (here Dense_0's). ``mask_compatible_extra_args`` changes nothing: it masks
  only extra arguments with the structure of the params, which ``stats`` has
  not (one LayerStats per layer, not one array per parameter)."""
  params, _, grad_fn, xs, ys = problem
  labels = {k: "eva" if k in EVA_LAYERS else "adam" for k in params}
  assert set(params) == set(EVA_LAYERS + ADAM_LAYERS)
  eva, adam = eva_optax.eva(0.05, weight_decay=1e-3), optax.adam(1e-2)
  tx = optax.partition(
    {"eva": eva, "adam": adam}, labels, mask_compatible_extra_args=mask_compatible_extra_args
  )
  update = jax.jit(tx.update)
  eva_update, adam_update = jax.jit(eva.update), jax.jit(adam.update)

  p, state = params, tx.init(params)
  eva_state, adam_state = (
    eva.init(_subset(params, EVA_LAYERS)),
    adam.init(_subset(params, ADAM_LAYERS)),
  )
  for i in range(3):
    _, grads, stats = grad_fn(p, xs[i], ys[i])
    assert set(stats) == {"Dense_0", "Dense_1", "Dense_2"}
    assert jax.tree.structure(stats) != jax.tree.structure(grads)
    updates, state = update(grads, state, p, stats=stats)
    eva_updates, eva_state = eva_update(
      _subset(grads, EVA_LAYERS),
      eva_state,
      _subset(p, EVA_LAYERS),
      stats=_subset(stats, EVA_LAYERS),
    )
    adam_updates, adam_state = adam_update(
      _subset(grads, ADAM_LAYERS), adam_state, _subset(p, ADAM_LAYERS)
    )
    _close(updates, {**eva_updates, **adam_updates})
    p = optax.apply_updates(p, updates)

  # Eva's state in the partition: running averages of its own layers only.
  inner = state.inner_states["eva"].inner_state[0]
  assert isinstance(inner, eva_optax.ScaleByEvaState)
  assert set(inner.input_mean) == set(EVA_LAYERS)
  _close(inner, eva_state[0])
  _close(state.inner_states["adam"].inner_state[0].mu["Dense_0"], adam_state[0].mu["Dense_0"])


def test_partition_cannot_split_one_layer(problem):
  """A layer whose kernel goes to Eva and bias elsewhere is refused: ā would
  need its trailing 1 for a bias Eva does not own."""
  params, _, grad_fn, xs, ys = problem
  labels = {k: "eva" if k in EVA_LAYERS else "adam" for k in params}
  labels["Dense_1"] = {"kernel": "eva", "bias": "adam"}
  tx = optax.partition({"eva": eva_optax.eva(0.05), "adam": optax.adam(1e-2)}, labels)
  _, grads, stats = grad_fn(params, xs[0], ys[0])
  with pytest.raises(ValueError, match="Dense_1.*has_bias"):
    tx.update(grads, tx.init(params), params, stats=stats)


# ---------------------------------------------------------------------------
# (c) inject_hyperparams: learning rate and damping changed between steps.


def test_inject_hyperparams_changes_apply_without_recompiling(problem):
  params, _, grad_fn, xs, ys = problem
  tx = optax.inject_hyperparams(eva_optax.eva)(learning_rate=0.1, damping=0.03, weight_decay=1e-3)
  traces = []

  @jax.jit
  def step(p, s, x, y):
    traces.append(1)
    _, grads, stats = grad_fn(p, x, y)
    updates, s = tx.update(grads, s, p, stats=stats)
    return s, updates, grads, stats

  p, state = params, tx.init(params)
  schedule = [(0.1, 0.03), (0.05, 0.3), (0.2, 0.01)]
  for i, (lr, damping) in enumerate(schedule):
    # float32 arrays: a Python float is weakly typed and would retrace the step.
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    state.hyperparams["damping"] = jnp.asarray(damping, jnp.float32)
    before = state.inner_state
    state, updates, grads, stats = step(p, state, xs[i], ys[i])
    fresh = eva_optax.eva(lr, damping=damping, weight_decay=1e-3)
    fresh_updates, fresh_state = jax.jit(fresh.update)(grads, before, p, stats=stats)
    _close(updates, fresh_updates)
    _close(state.inner_state, fresh_state)
    if i == 1:
      # The change mattered: the previous values give another step.
      old = eva_optax.eva(schedule[i - 1][0], damping=schedule[i - 1][1], weight_decay=1e-3)
      old_updates, _ = jax.jit(old.update)(grads, before, p, stats=stats)
      assert _max_diff(updates, old_updates) > 1e-4
    p = optax.apply_updates(p, updates)
  assert len(traces) == 1, "changing hyperparameters must not recompile the step"


# ---------------------------------------------------------------------------
# (d) MultiSteps: what happens to the statistics of the micro-batches.


def test_multisteps_uses_the_statistics_of_the_last_micro_batch_only(problem):
  """MultiSteps calls the inner update at every micro-step with the running
  mean of the gradients and *that micro-step's* extra arguments, and keeps the
  inner state only when it emits. So Eva gets the mean gradient of the k
  micro-batches but the statistics of the last one alone; the statistics of
  the earlier micro-batches are dropped (not averaged, not in the running
  averages)."""
  params, _, grad_fn, xs, ys = problem
  eva = eva_optax.eva(0.05, weight_decay=1e-3)
  multi = optax.MultiSteps(eva, every_k_schedule=2)
  multi_update, eva_update = jax.jit(multi.update), jax.jit(eva.update)

  state0 = multi.init(params)
  _, g0, s0 = grad_fn(params, xs[0], ys[0])
  _, g1, s1 = grad_fn(params, xs[1], ys[1])

  # Micro-step 1: zero updates, inner state untouched.
  u0, state1 = multi_update(g0, state0, params, stats=s0)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u0))
  _equal(state1.inner_opt_state, state0.inner_opt_state)
  assert int(state1.mini_step) == 1 and int(state1.gradient_step) == 0

  # Micro-step 2 (params unchanged by the zero update): Eva's step on the mean
  # gradient with the last micro-batch's statistics.
  u1, state2 = multi_update(g1, state1, params, stats=s1)
  assert int(state2.mini_step) == 0 and int(state2.gradient_step) == 1
  mean = jax.tree.map(lambda a, b: a + (b - a) / 2, g0, g1)  # MultiSteps' running mean
  last, last_state = eva_update(mean, eva.init(params), params, stats=s1)
  _close(u1, last)
  _close(state2.inner_opt_state, last_state)
  _close(state2.inner_opt_state[0].input_mean, {name: s.input_mean for name, s in s1.items()})

  # Not the first micro-batch's statistics, nor those of the whole batch.
  first, _ = eva_update(mean, eva.init(params), params, stats=s0)
  assert _max_diff(u1, first) > 1e-3
  x01, y01 = jnp.concatenate([xs[0], xs[1]]), jnp.concatenate([ys[0], ys[1]])
  _, g01, s01 = grad_fn(params, x01, y01)
  _close(g01, mean)
  whole, _ = eva_update(g01, eva.init(params), params, stats=s01)
  assert _max_diff(u1, whole) > 1e-3
  # The whole batch's statistics: ā is the mean of the micro-batches' ā, and
  # ḡ (gradient of the *mean* loss, so 1/batch in it) half their mean.
  for name in s01:
    _close(s01[name].input_mean, (s0[name].input_mean + s1[name].input_mean) / 2)
    _close(s01[name].output_grad_mean, (s0[name].output_grad_mean + s1[name].output_grad_mean) / 4)


def test_multisteps_inside_chain_drops_the_statistics(problem):
  """optax.MultiSteps, and its .gradient_transformation(), are not
  GradientTransformationExtraArgs: inside optax.chain (or any wrapper that
  calls optax.with_extra_args_support) the extra arguments are dropped, and
  Eva says it got no statistics. MultiSteps must be the outermost wrapper,
  its own ``update`` called with ``stats=``."""
  params, _, grad_fn, xs, ys = problem
  _, grads, stats = grad_fn(params, xs[0], ys[0])
  multi = optax.MultiSteps(eva_optax.eva(0.05), every_k_schedule=2)
  assert not isinstance(multi.gradient_transformation(), optax.GradientTransformationExtraArgs)
  for tx in (
    optax.chain(optax.clip_by_global_norm(1.0), multi),
    optax.chain(multi.gradient_transformation()),
  ):
    with pytest.raises(ValueError, match="needs the layer statistics"):
      tx.update(grads, tx.init(params), params, stats=stats)


# ---------------------------------------------------------------------------
# (e) apply_if_finite: a NaN step leaves no trace.


def test_apply_if_finite_skips_a_nan_step_exactly(problem):
  params, _, grad_fn, xs, ys = problem
  tx = optax.apply_if_finite(eva_optax.eva(0.05, weight_decay=1e-3), max_consecutive_errors=5)

  @jax.jit
  def step(p, s, x, y):
    _, grads, stats = grad_fn(p, x, y)
    updates, s = tx.update(grads, s, p, stats=stats)
    return optax.apply_updates(p, updates), s

  nan_x = xs[1].at[0, 0].set(jnp.nan)
  _, nan_grads, _ = grad_fn(params, nan_x, ys[1])
  assert not all(np.isfinite(g).all() for g in jax.tree.leaves(nan_grads))

  p1, s1 = step(params, tx.init(params), xs[0], ys[0])
  p2, s2 = step(p1, s1, nan_x, ys[1])
  _equal(p2, p1)
  _equal(s2.inner_state, s1.inner_state)
  assert (int(s2.notfinite_count), bool(s2.last_finite), int(s2.total_notfinite)) == (1, False, 1)
  p3, s3 = step(p2, s2, xs[2], ys[2])

  # The run that never saw the NaN batch.
  q1, r1 = step(params, tx.init(params), xs[0], ys[0])
  q2, r2 = step(q1, r1, xs[2], ys[2])
  _equal(p3, q2)
  _equal(s3.inner_state, r2.inner_state)
  assert int(s3.inner_state[0].count) == 2
  assert (int(s3.notfinite_count), bool(s3.last_finite), int(s3.total_notfinite)) == (0, True, 1)
