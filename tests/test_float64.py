"""float64 end to end: with ``jax_enable_x64`` and float64 parameters, the
statistics, the optimizer state and the update stay in float64, and Eva's step
equals its formula computed by NumPy in float64 to float64 rounding (a float32
step anywhere would leave errors of 1e-7 and more)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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
  pre = np.asarray(x) @ np.asarray(params["hidden"]["kernel"]) + np.asarray(params["hidden"]["bias"])
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
