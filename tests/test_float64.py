"""float64 end to end: with ``jax_enable_x64`` and float64 parameters, the
statistics, the optimizer state and the update stay in float64, Eva's step
equals its formula computed by NumPy in float64 to float64 rounding (a float32
step anywhere would leave errors of 1e-7 and more), and so does a trajectory of
several steps against a NumPy reference of the whole rule (forward and
backward pass, running averages, KL clip, weight decay, momentum)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax


@pytest.fixture()
def x64():
  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", before)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5, param_dtype=jnp.float64, dtype=jnp.float64, name="hidden")(x))
    return nn.Dense(3, param_dtype=jnp.float64, dtype=jnp.float64, name="out")(h)


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 4)) * 1e-3 + 1.0)  # a mean far from 0, small spread
  y = jnp.asarray(rng.normal(size=(8, 3)))
  model = _Net()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return model, params, loss, x, y


@pytest.mark.parametrize(
  "alias, statistics",
  [
    (eva_optax.eva, eva_optax.EVA_STATISTICS),
    (eva_optax.eva_foof, eva_optax.EVA_FOOF_STATISTICS),
    (eva_optax.kfac, eva_optax.KFAC_STATISTICS),
    (eva_optax.foof, eva_optax.FOOF_STATISTICS),
  ],
)
def test_statistics_state_and_update_stay_float64(x64, alias, statistics):
  _, params, loss, _, _ = _problem()
  _, grads, stats = eva_optax.value_and_grad(loss, statistics=statistics)(params)
  tx = alias(0.1)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, stats=stats)
  captured = [a for a in jax.tree.leaves(stats)]
  assert captured and {a.dtype for a in captured} == {jnp.dtype(jnp.float64)}
  floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert floats and {a.dtype for a in floats} == {jnp.dtype(jnp.float64)}
  assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float64)}


def test_eva_step_equals_the_float64_formula(x64):
  """ā from the inputs, ḡ from jax.vjp in float64, then
  V = (Ĝ − ḡᵀĜā/(‖ā‖²‖ḡ‖² + γ) ḡāᵀ)/γ per layer, ν = min(1, √(κ/(η²Σ⟨V, Ĝ⟩))),
  first step −η ν V (momentum and weight decay start from zero)."""
  model, params, loss, x, y = _problem()
  lr, gamma, kappa = 0.1, 0.03, 0.001
  _, grads, stats = eva_optax.value_and_grad(loss)(params)
  tx = eva_optax.eva(lr, damping=gamma, kl_clip=kappa)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)

  # Independent statistics: layer inputs, and ∂L/∂y by a VJP of each output.
  hidden_in = np.asarray(x)
  pre = np.asarray(x) @ np.asarray(params["hidden"]["kernel"]) + np.asarray(
    params["hidden"]["bias"]
  )
  out_in = np.tanh(pre)

  def loss_of_outputs(z_hidden, z_out):
    h = jnp.tanh(z_hidden)
    out = h @ params["out"]["kernel"] + params["out"]["bias"] + z_out
    return jnp.mean((out - y) ** 2)

  z_h = jnp.asarray(pre)
  g_hidden_pre = jax.grad(lambda z: loss_of_outputs(z, 0.0))(z_h)
  g_out = jax.grad(lambda z: loss_of_outputs(z_h, z))(jnp.zeros((8, 3)))
  inputs = {"hidden": hidden_in, "out": out_in}
  output_grads = {"hidden": np.asarray(g_hidden_pre), "out": np.asarray(g_out)}

  vs, total = {}, 0.0
  for name in ("hidden", "out"):
    a = np.append(inputs[name].mean(0), 1.0)  # [ā, 1] for the bias row
    g = output_grads[name].sum(0) / 8  # mean over the batch of ∂L/∂y (the loss is a mean)
    full = np.vstack([np.asarray(grads[name]["kernel"]), np.asarray(grads[name]["bias"])[None]])
    v = (full - (g @ full.T @ a) / (a @ a * (g @ g) + gamma) * np.outer(a, g)) / gamma
    vs[name] = v
    total += np.sum(v * full)
  nu = min(1.0, np.sqrt(kappa / (lr**2 * total)))
  for name, v in vs.items():
    np.testing.assert_allclose(updates[name]["kernel"], -lr * nu * v[:-1], rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(updates[name]["bias"], -lr * nu * v[-1], rtol=1e-11, atol=1e-15)


def _numpy_forward_backward(p, x, y):
  """The loss of _Net and, per layer, its input rows, dL/dy and the gradient,
  by hand in float64 NumPy (no JAX)."""
  pre = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
  h = np.tanh(pre)
  out = h @ p["out"]["kernel"] + p["out"]["bias"]
  loss = np.mean((out - y) ** 2)
  d_out = 2.0 * (out - y) / out.size  # ∂L/∂y of the mean loss
  d_pre = (d_out @ p["out"]["kernel"].T) * (1.0 - h**2)
  inputs = {"hidden": x, "out": h}
  output_grads = {"hidden": d_pre, "out": d_out}
  grads = {
    name: {"kernel": inputs[name].T @ output_grads[name], "bias": output_grads[name].sum(0)}
    for name in inputs
  }
  return loss, inputs, output_grads, grads


def test_eva_trajectory_equals_a_float64_numpy_reference(x64):
  """Six Eva steps, a new batch each, with momentum, weight decay and a
  learning-rate schedule, against Eva's rule written out in NumPy float64
  (DESIGN.md §1) from NumPy's own forward and backward pass:

  ā ← 0.05·ā + 0.95·ā_new (the first step takes ā_new), ḡ likewise;
  a = [ā, 1], M = [∇W; ∇b] (in + 1, out), s = aᵀMḡ,
  V = (M − s/(‖a‖²‖ḡ‖² + γ) a ḡᵀ)/γ, ν = min(1, √(κ/(η_t² Σ⟨V, M⟩))),
  d = νV + λW, buf ← μ·buf + d, W ← W − η_t·buf.

  The parameters after every step agree to 1e-10 relative; the KL clip is
  active on some steps and not on others."""
  model, params, _, _, _ = _problem()
  # A schedule computed in float64 (optax's own schedules give float32 values
  # for the int32 step count, even with jax_enable_x64).
  lr = lambda count: 0.3 / (1.0 + count)
  gamma, kappa, decay, momentum, wd = 0.03, 0.3, 0.05, 0.9, 1e-3
  tx = eva_optax.eva(
    lr, momentum=momentum, weight_decay=wd, damping=gamma, kl_clip=kappa, stat_decay=decay
  )
  rng = np.random.default_rng(1)
  batches = [(rng.normal(size=(8, 4)) * 0.5 + 1.0, rng.normal(size=(8, 3))) for _ in range(6)]

  @jax.jit
  def step(params, opt_state, x, y):
    loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    value, grads, stats = eva_optax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, value

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  averages, buffers, nus = {}, jax.tree.map(np.zeros_like, p), []
  opt_state = tx.init(params)
  for t, (x, y) in enumerate(batches):
    params, opt_state, value = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))

    loss, inputs, output_grads, grads = _numpy_forward_backward(p, x, y)
    np.testing.assert_allclose(value, loss, rtol=1e-12)
    eta = 0.3 / (1.0 + t)
    vs, total = {}, 0.0
    for name in ("hidden", "out"):
      new = (inputs[name].mean(0), output_grads[name].mean(0))
      old = averages.get(name, new)
      a_mean, g_mean = averages[name] = tuple(decay * o + (1 - decay) * n for o, n in zip(old, new))
      a = np.append(a_mean, 1.0)
      m = np.vstack([grads[name]["kernel"], grads[name]["bias"][None]])
      s = a @ m @ g_mean
      vs[name] = (m - s / (a @ a * (g_mean @ g_mean) + gamma) * np.outer(a, g_mean)) / gamma
      total += np.sum(vs[name] * m)
    nu = min(1.0, np.sqrt(kappa / (eta**2 * total))) if total > 0 else 1.0
    nus.append(nu)
    for name, v in vs.items():
      for leaf, direction in (("kernel", v[:-1]), ("bias", v[-1])):
        d = nu * direction + wd * p[name][leaf]
        buffers[name][leaf] = momentum * buffers[name][leaf] + d
        p[name][leaf] = p[name][leaf] - eta * buffers[name][leaf]

    for name in p:
      for leaf in p[name]:
        got, want = np.asarray(params[name][leaf]), p[name][leaf]
        assert got.dtype == np.float64
        np.testing.assert_allclose(
          got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max(), err_msg=f"step {t} {name}/{leaf}"
        )
  assert min(nus) < 1.0 and max(nus) == 1.0, nus
