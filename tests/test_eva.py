"""Eva (``eva_optax._src.eva``): its rule against dense linear algebra, its steps
against a NumPy re-implementation, and the optax contract of ``eva`` / ``scale_by_eva``.

Sherman–Morrison: V = γ (ā āᵀ ⊗ ḡ ḡᵀ + γI)⁻¹ vec Ĝ, for one layer, a stack and a
group of layers; then the KL clip ν across layers. The KL factors and the
running averages alone are tested in test_kl.py and test_running_average.py.
"""

import functools

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from eva_optax._src.eva import sherman_morrison, sherman_morrison_layers
from eva_optax._src import state_entries
from eva_optax._src.layerwise_rule import LayerGradient
from eva_optax._src.statistics import KernelLayout
from models import layer_group

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------
# Sherman–Morrison == explicit solve.


@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
  in_dim=st.integers(1, 6),
  out_dim=st.integers(1, 5),
  bias=st.booleans(),
  damping=st.floats(1e-3, 10.0),
  seed=st.integers(0, 2**16),
)
def test_sherman_morrison_equals_explicit_solve(in_dim, out_dim, bias, damping, seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=in_dim)
  g = rng.normal(size=out_dim)
  kernel = rng.normal(size=(in_dim, out_dim))  # (in, out), as Flax stores it
  b = rng.normal(size=out_dim) if bias else None
  # Paper form: Ĝ (out, in+1), ā with a trailing 1 when there is a bias.
  g_hat = np.concatenate([kernel.T, b[:, None]], axis=1) if bias else kernel.T
  a_hat = np.concatenate([a, [1.0]]) if bias else a
  u = np.kron(g, a_hat)  # vec of ḡ āᵀ, row-major, like g_hat.reshape(-1)
  fisher = np.kron(np.outer(g, g), np.outer(a_hat, a_hat))
  assert np.allclose(fisher, np.outer(u, u))
  expected = np.linalg.solve(fisher + damping * np.eye(u.size), g_hat.reshape(-1))
  expected = expected.reshape(g_hat.shape)

  p = eva_optax.sherman_morrison(
    LayerGradient(
      jnp.asarray(kernel, jnp.float32), None if b is None else jnp.asarray(b, jnp.float32)
    ),
    jnp.asarray(a, jnp.float32),
    jnp.asarray(g, jnp.float32),
    jnp.float32(damping),
  )
  got = (
    np.concatenate([np.asarray(p.kernel).T, np.asarray(p.bias)[:, None]], 1)
    if bias
    else np.asarray(p.kernel).T
  )
  scale = np.abs(expected).max() + 1e-6
  np.testing.assert_allclose(got / damping, expected, rtol=2e-4, atol=2e-4 * scale)
  np.testing.assert_allclose(
    float(p.update_dot_grad) / damping, float(np.vdot(expected, g_hat)), rtol=2e-3, atol=1e-4
  )


def test_sherman_morrison_stacked_layers_are_independent():
  rng = np.random.default_rng(0)
  k = rng.normal(size=(3, 4, 5)).astype(np.float32)
  b = rng.normal(size=(3, 5)).astype(np.float32)
  a = rng.normal(size=(3, 4)).astype(np.float32)
  g = rng.normal(size=(3, 5)).astype(np.float32)
  stacked = eva_optax.sherman_morrison(LayerGradient(k, b), a, g, 0.1)
  total = 0.0
  for i in range(3):
    one = eva_optax.sherman_morrison(LayerGradient(k[i], b[i]), a[i], g[i], 0.1)
    np.testing.assert_allclose(stacked.kernel[i], one.kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stacked.bias[i], one.bias, rtol=1e-5, atol=1e-6)
    total += float(one.update_dot_grad)
  np.testing.assert_allclose(float(stacked.update_dot_grad), total, rtol=1e-5)


def _dense_sherman_morrison(k, b, a, g, damping):
  """γ (ā āᵀ ⊗ ḡ ḡᵀ + γI)⁻¹ vec(Ĝ) by an explicit solve (Ĝ = [∇W; ∇b], ā = [ā, 1])."""
  full = k if b is None else np.vstack([k, b[None]])
  a = a if b is None else np.append(a, 1.0)
  v = np.kron(a, g)
  fisher = np.outer(v, v) + damping * np.eye(v.size)
  return (damping * np.linalg.solve(fisher, full.reshape(-1))).reshape(full.shape)


def test_grouped_sherman_morrison_equals_explicit_solve_per_layer():
  grads, a, g = layer_group()
  group = sherman_morrison_layers(grads, a, g, 0.03)
  total = 0.0
  for l, (grad, x, y) in enumerate(zip(grads, a, g)):
    one = sherman_morrison(grad, x, y, 0.03)
    np.testing.assert_allclose(group.kernel[l], one.kernel, rtol=1e-6, atol=1e-7)
    assert (group.bias[l] is None) == (grad.bias is None)
    k, b = np.asarray(grad.kernel, np.float64), grad.bias
    stack = k.shape[:-2]
    for idx in np.ndindex(*stack):
      bias = None if b is None else np.asarray(b, np.float64)[idx]
      want = _dense_sherman_morrison(
        k[idx], bias, np.asarray(x, np.float64)[idx], np.asarray(y, np.float64)[idx], 0.03
      )
      np.testing.assert_allclose(
        np.asarray(group.kernel[l])[idx], want[: k.shape[-2]], rtol=1e-4, atol=1e-5
      )
      if bias is not None:
        np.testing.assert_allclose(np.asarray(group.bias[l])[idx], want[-1], rtol=1e-4, atol=1e-5)
        full = np.vstack([k[idx], bias[None]])
      else:
        full = k[idx]
      total += np.sum(want * full)
  np.testing.assert_allclose(group.update_dot_grad, total, rtol=1e-4)


# ---------------------------------------------------------------------------
# Small models shared by the trajectory and contract tests.


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    x = nn.LayerNorm()(x)  # not a layer: passes through
    x = nn.Dense(5, use_bias=False)(x)
    return nn.Dense(3)(nn.tanh(x))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
    x = nn.relu(nn.Conv(5, (2, 2), padding="VALID", use_bias=False)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _problem(model, x_shape, seed=0):
  key = jax.random.key(seed)
  kx, ky, kp = jax.random.split(key, 3)
  xs = jax.random.normal(kx, (4,) + x_shape)  # 4 steps of data
  ys = jax.random.normal(ky, (4, x_shape[0], 3))
  params = model.init(kp, xs[0])["params"]

  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  return params, loss_fn, xs, ys


PROBLEMS = {
  "mlp": lambda: _problem(MLP(), (8, 7)),
  "cnn": lambda: _problem(CNN(), (8, 9, 9, 2)),
}


def _numpy_eva_trajectory(
  params, grads_and_stats, *, lr, momentum, wd, damping, kl_clip, stat_decay
):
  """The whole update in NumPy, layer by layer, from the captured statistics."""
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  flat = {
    "/".join(str(k.key) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  buf = {k: np.zeros_like(v) for k, v in flat.items()}
  avg_a, avg_g = {}, {}
  for step, (grads, stats) in enumerate(grads_and_stats):
    gflat = {
      "/".join(str(k.key) for k in path): np.asarray(v, np.float64)
      for path, v in jax.tree_util.tree_flatten_with_path(grads)[0]
    }
    layers = {name: s for name, s in stats.items()}
    vs, total = {}, 0.0
    for name, s in layers.items():
      a_new, g_new = (
        np.asarray(s.input_mean, np.float64),
        np.asarray(s.output_grad_mean, np.float64),
      )
      if step == 0:
        avg_a[name], avg_g[name] = a_new, g_new
      else:
        avg_a[name] = stat_decay * avg_a[name] + (1 - stat_decay) * a_new
        avg_g[name] = stat_decay * avg_g[name] + (1 - stat_decay) * g_new
      kernel = gflat[name + "/kernel"]
      kmat = kernel.reshape(-1, kernel.shape[-1]).T  # (out, in)
      a = avg_a[name]
      if s.has_bias:
        kmat = np.concatenate([kmat, gflat[name + "/bias"][:, None]], axis=1)
        a = np.concatenate([a, [1.0]])
      g = avg_g[name]
      sval = g @ kmat @ a
      v = (kmat - sval / (a @ a * (g @ g) + damping) * np.outer(g, a)) / damping
      vs[name] = v
      total += np.sum(v * kmat)
    nu = min(1.0, np.sqrt(kl_clip / (lr**2 * total))) if total > 0 else 1.0
    d = dict(gflat)
    for name, v in vs.items():
      kernel_shape = gflat[name + "/kernel"].shape
      n_in = int(np.prod(kernel_shape[:-1]))
      d[name + "/kernel"] = (nu * v[:, :n_in]).T.reshape(kernel_shape)
      if layers[name].has_bias:
        d[name + "/bias"] = nu * v[:, n_in]
    for k in flat:
      step_dir = d[k] + wd * flat[k]
      buf[k] = momentum * buf[k] + step_dir
      flat[k] = flat[k] - lr * buf[k]
  return flat


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_trajectory_matches_numpy_reimplementation(problem):
  params, loss_fn, xs, ys = PROBLEMS[problem]()
  hp = dict(lr=0.3, momentum=0.9, wd=0.01, damping=0.05, kl_clip=0.002, stat_decay=0.2)
  tx = eva_optax.eva(
    hp["lr"],
    momentum=hp["momentum"],
    weight_decay=hp["wd"],
    damping=hp["damping"],
    kl_clip=hp["kl_clip"],
    stat_decay=hp["stat_decay"],
  )
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn))
  state = tx.init(params)
  p = params
  # The NumPy model re-uses the gradients and statistics the JAX run saw at each step.
  seen = []
  for x, y in zip(xs, ys):
    _, grads, stats = grad_fn(p, x, y)
    seen.append((grads, stats))
    updates, state = tx.update(grads, state, p, stats=stats)
    p = optax.apply_updates(p, updates)
  expected = _numpy_eva_trajectory(params, seen, **hp)
  got = {
    "/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(p)[0]
  }
  assert set(got) == set(expected)
  for k in got:
    np.testing.assert_allclose(got[k], expected[k], rtol=2e-4, atol=2e-6, err_msg=k)
  # The clip was active at least once, or the test would not test it.
  assert not np.allclose(got["Dense_0/kernel"], params["Dense_0"]["kernel"])


def test_kl_clip_is_active_and_global():
  """ν is one factor for all preconditioned layers, and pass-through leaves are unscaled."""
  params, loss_fn, xs, ys = PROBLEMS["mlp"]()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, xs[0], ys[0])
  big = eva_optax.scale_by_eva(10.0, kl_clip=1e-6)
  none = eva_optax.scale_by_eva(10.0, kl_clip=1e9)
  u_big, _ = big.update(grads, big.init(params), params, stats=stats)
  u_none, _ = none.update(grads, none.init(params), params, stats=stats)
  ratios = [
    float(jnp.linalg.norm(u_big[m][k]) / jnp.linalg.norm(u_none[m][k]))
    for m in ("Dense_0", "Dense_1", "Dense_2")
    for k in u_big[m]
  ]
  assert max(ratios) < 1.0
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
  for k in ("scale", "bias"):
    np.testing.assert_array_equal(u_big["LayerNorm_0"][k], grads["LayerNorm_0"][k])


def test_kl_normalise_divides_by_sqrt_of_global_dot():
  """Extension form: V = P / sqrt(Σ⟨P, Ĝ⟩) with P the projection without 1/γ."""
  params, loss_fn, xs, ys = PROBLEMS["cnn"]()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, xs[0], ys[0])
  gamma = 0.1
  normalised = eva_optax.scale_by_eva(scaling="kl_normalise", damping=gamma)
  unclipped = eva_optax.scale_by_eva(1.0, damping=gamma, kl_clip=1e12)  # ν = 1: P / γ
  u_norm, _ = normalised.update(grads, normalised.init(params), params, stats=stats)
  u_clip, _ = unclipped.update(grads, unclipped.init(params), params, stats=stats)
  projection = jax.tree.map(lambda u: u * gamma, u_clip)
  total = sum(float(jnp.vdot(projection[m][k], grads[m][k])) for m in grads for k in grads[m])
  assert total > 0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b / np.sqrt(total), rtol=1e-4, atol=1e-7),
    u_norm,
    projection,
  )


def test_where_the_correction_vanishes_eva_is_sgd_over_damping_with_a_norm_clip():
  """‖ā‖²‖ḡ‖² ≪ γ (what ``describe`` flags): V = Ĝ/γ, and ν caps the step η·ν·V at the norm
  sqrt(κ/γ) in the gradient's direction, over the preconditioned layers together."""
  params, loss_fn, xs, ys = PROBLEMS["mlp"]()
  gamma, lr = 0.03, 0.5
  pre = ("Dense_0", "Dense_1", "Dense_2")

  def updates(loss, kl_clip):
    _, grads, stats = eva_optax.value_and_grad(loss)(params, xs[0], ys[0])
    tx = eva_optax.scale_by_eva(lr, damping=gamma, kl_clip=kl_clip)
    return grads, tx.update(grads, tx.init(params), params, stats=stats)[0]

  def apart(grads, u, scale):  # largest relative gap between u and scale·Ĝ
    return max(
      float(jnp.linalg.norm(u[m][k] - scale * grads[m][k]) / jnp.linalg.norm(u[m][k]))
      for m in pre
      for k in grads[m]
    )

  # The problem's own loss: the correction acts, V is not Ĝ/γ.
  grads, u = updates(loss_fn, 1e12)
  assert apart(grads, u, 1 / gamma) > 1e-3
  # The loss × 1e-4 (ḡ × 1e-4, ‖ā‖²‖ḡ‖² × 1e-8): V = Ĝ/γ, unclipped ...
  small = lambda p, x, y: 1e-4 * loss_fn(p, x, y)
  grads, u = updates(small, 1e12)
  assert apart(grads, u, 1 / gamma) < 1e-5
  # ... and clipped: the step is sqrt(κ/γ) long, along Ĝ.
  kappa = 1e-12
  grads, u = updates(small, kappa)
  norm = np.sqrt(sum(float(jnp.vdot(grads[m][k], grads[m][k])) for m in pre for k in grads[m]))
  assert apart(grads, u, np.sqrt(kappa / gamma) / (lr * norm)) < 1e-5
  step = lr * np.sqrt(sum(float(jnp.vdot(u[m][k], u[m][k])) for m in pre for k in u[m]))
  np.testing.assert_allclose(step, np.sqrt(kappa / gamma), rtol=1e-5)
  for k in ("scale", "bias"):  # pass-through leaves keep their gradient
    np.testing.assert_array_equal(u["LayerNorm_0"][k], grads["LayerNorm_0"][k])


# ---------------------------------------------------------------------------
# Composition and the optax contract.


def _run(tx, problem="mlp", steps=3, **extra):
  params, loss_fn, xs, ys = PROBLEMS[problem]()
  grad_fn = eva_optax.value_and_grad(loss_fn)
  state = tx.init(params)
  p = params
  for x, y in list(zip(xs, ys))[:steps]:
    _, grads, stats = grad_fn(p, x, y)
    updates, state = tx.update(grads, state, p, stats=stats, **extra)
    p = optax.apply_updates(p, updates)
  return p, state


@pytest.mark.parametrize("nesterov", [False, True])
def test_preconditioner_composition_equals_alias(nesterov):
  lr, wd = 0.2, 5e-4
  alias, _ = _run(eva_optax.eva(lr, momentum=0.9, nesterov=nesterov, weight_decay=wd), "cnn")
  composed, _ = _run(
    optax.chain(
      eva_optax.scale_by_eva(learning_rate=lr),
      optax.add_decayed_weights(wd),
      optax.sgd(lr, momentum=0.9, nesterov=nesterov),
    ),
    "cnn",
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), alias, composed)


def test_unknown_extra_args_are_ignored():
  plain, _ = _run(eva_optax.eva(0.1))
  extra, _ = _run(eva_optax.eva(0.1), unrelated=jnp.ones(3), other="x")
  jax.tree.map(np.testing.assert_array_equal, plain, extra)


def test_inject_hyperparams_gives_identical_updates():
  kw = dict(momentum=0.9, weight_decay=1e-3, damping=0.05, kl_clip=0.01)
  plain, _ = _run(eva_optax.eva(0.1, **kw))
  injected, state = _run(optax.inject_hyperparams(eva_optax.eva)(learning_rate=0.1, **kw))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), plain, injected)
  assert set(state.hyperparams) >= {"learning_rate", "damping", "kl_clip"}


def test_schedules_are_accepted():
  lr = optax.linear_schedule(0.2, 0.05, 3)
  damping = optax.exponential_decay(0.1, 1, 0.5)
  clip = optax.constant_schedule(0.01)
  scheduled, _ = _run(eva_optax.eva(lr, damping=damping, kl_clip=clip))
  # Same as applying each step's values by hand through inject_hyperparams.
  params, loss_fn, xs, ys = PROBLEMS["mlp"]()
  grad_fn = eva_optax.value_and_grad(loss_fn)
  tx = optax.inject_hyperparams(eva_optax.eva)(learning_rate=0.2, damping=0.1, kl_clip=0.01)
  state, p = tx.init(params), params
  for i, (x, y) in enumerate(list(zip(xs, ys))[:3]):
    state.hyperparams["learning_rate"] = lr(i)
    state.hyperparams["damping"] = damping(i)
    _, grads, stats = grad_fn(p, x, y)
    updates, state = tx.update(grads, state, p, stats=stats)
    p = optax.apply_updates(p, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scheduled, p)


def test_works_inside_chain_and_apply_if_finite():
  tx = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), eva_optax.eva(0.1)), 3)
  params, state = _run(tx)
  assert int(state.notfinite_count) == 0
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(params))


def test_non_finite_step_is_skipped_without_corrupting_state():
  params, loss_fn, xs, ys = PROBLEMS["mlp"]()
  tx = optax.apply_if_finite(eva_optax.eva(0.1), 3)
  state = tx.init(params)
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, xs[0], ys[0])
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  step = jax.jit(functools.partial(tx.update))
  updates, new_state = step(bad, state, params, stats=stats)
  assert int(new_state.notfinite_count) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_no_recompilation_on_second_call():
  params, loss_fn, xs, ys = PROBLEMS["cnn"]()
  tx = eva_optax.eva(0.1, weight_decay=1e-4)
  grad_fn = eva_optax.value_and_grad(loss_fn)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    loss, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  for x, y in zip(xs, ys):
    params, state, loss = step(params, state, x, y)
  assert len(traces) == 1
  assert step._cache_size() == 1


# ---------------------------------------------------------------------------
# Errors.


def test_update_without_stats_is_a_clear_error():
  params, loss_fn, xs, ys = PROBLEMS["mlp"]()
  tx = eva_optax.eva(0.1)
  grads = jax.grad(loss_fn)(params, xs[0], ys[0])
  with pytest.raises(ValueError, match="stats=stats"):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(damping=0.0), "damping"),
    (dict(damping=-1.0), "damping"),
    (dict(kl_clip=0.0), "kl_clip"),
    (dict(stat_decay=1.0), "stat_decay"),
    (dict(stat_decay=-0.1), "stat_decay"),
    (dict(momentum=1.5), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(damping=float("nan")), "damping"),
    (dict(scaling="other"), "scaling"),
  ],
)
def test_bad_hyperparameters_name_the_parameter(kwargs, name):
  with pytest.raises(ValueError, match=name):
    eva_optax.eva(0.1, **kwargs)


def test_negative_learning_rate_is_refused():
  with pytest.raises(ValueError, match="learning_rate"):
    eva_optax.eva(-0.1)


class Stacked(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.tanh(nn.Dense(h.shape[-1], use_bias=False)(h)), None

    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
      x, None
    )
    return nn.DenseGeneral((3, 1), use_bias=False)(x).reshape(x.shape[0], 3)


def test_layouts_the_parameters_leave_open_are_taken_from_the_capture():
  """A scanned Dense and a DenseGeneral with two outputs, both without bias:
  their kernels' layouts cannot be told from the parameters, yet tx.init(params)
  alone gives, step after step, the updates of an optimizer given the captured
  layouts; the state holds each statistic at the head of a flat buffer."""
  model = Stacked()
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jax.random.normal(jax.random.key(1), (8, 3))
  params = model.init(jax.random.key(2), x)["params"]
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn))
  layouts = eva_optax.layouts_of(jax.eval_shape(eva_optax.value_and_grad(loss_fn), params)[2])
  assert layouts["ScanBlock_0"]["Dense_0"] == KernelLayout(1, 1)
  assert layouts["DenseGeneral_0"] == KernelLayout(0, 2)
  free, given = eva_optax.eva(0.1), eva_optax.eva(0.1, layouts=layouts)
  free_state, given_state = free.init(params), given.init(params)
  assert free_state[0].input_mean["ScanBlock_0"]["Dense_0"].ndim == 1
  assert given_state[0].input_mean["ScanBlock_0"]["Dense_0"].shape == (3, 5)
  p_free = p_given = params
  for _ in range(3):
    _, grads, stats = grad_fn(p_free)
    u_free, free_state = jax.jit(free.update)(grads, free_state, p_free, stats=stats)
    _, grads, stats = grad_fn(p_given)
    u_given, given_state = jax.jit(given.update)(grads, given_state, p_given, stats=stats)
    for a, b in zip(jax.tree.leaves(u_free), jax.tree.leaves(u_given)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    p_free, p_given = optax.apply_updates(p_free, u_free), optax.apply_updates(p_given, u_given)
  for name in ("input_mean", "output_grad_mean"):
    for path in (("ScanBlock_0", "Dense_0"), ("DenseGeneral_0",)):
      flat, exact = getattr(free_state[0], name), getattr(given_state[0], name)
      for key in path:
        flat, exact = flat[key], exact[key]
      np.testing.assert_allclose(
        state_entries.read_entry(flat, exact.shape, name), exact, rtol=1e-5, atol=1e-8
      )
  _, grads, stats = grad_fn(params)
  # Each stacked layer is preconditioned with its own statistics.
  one = eva_optax.scale_by_eva(0.1, layouts=layouts)
  u, _ = one.update(grads, one.init(params), params, stats=stats)
  k = grads["ScanBlock_0"]["Dense_0"]["kernel"]
  s = stats["ScanBlock_0"]["Dense_0"]
  per_layer = [
    eva_optax.sherman_morrison(
      LayerGradient(k[i], None), s.input_mean[i], s.output_grad_mean[i], 0.03
    )
    for i in range(3)
  ]
  ratio = np.asarray(u["ScanBlock_0"]["Dense_0"]["kernel"][1]) / (
    np.asarray(per_layer[1].kernel) / 0.03
  )
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)


def test_kl_factor_is_computed_once_not_per_layer():
  """ν is one scalar: the compiled update must not copy its computation (and
  the sum over all layers) into every layer's fused kernel, which made
  compile time grow with the square of the depth."""

  class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(12):
        x = nn.tanh(nn.Dense(8)(x))
      return x

  model = Deep()
  x = jnp.ones((4, 8))
  params = model.init(jax.random.key(0), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(
    lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  )(params)
  tx = eva_optax.eva(0.1)
  compiled = (
    jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
    .lower(grads, tx.init(params), params, stats)
    .compile()
  )
  assert compiled.as_text().count("minimum(") <= 2
