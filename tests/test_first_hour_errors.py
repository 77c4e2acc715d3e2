"""What a new user is told when a step goes wrong: each error names its fix.

One test per message: no statistics with NNX (``nnx.Optimizer.update`` or
``tx.update`` without ``stats=``), the Linen capture given an NNX model,
``optax.MultiSteps`` inside ``optax.chain``, Flax's own ``TrainState``, a loss
over the whole variables dict; then ``argnums`` as in ``jax.value_and_grad``,
and the warning of the modules passed through at the plain rate.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import eva_optax
from models import TwoLayerMLP

# Tiny programs compiled once and run once: fewer XLA passes (conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compiles")


@pytest.fixture(scope="module")
def linen():
  model = TwoLayerMLP()
  x = jax.random.normal(jax.random.key(1), (8, 5))
  y = jax.random.normal(jax.random.key(2), (8, 3))
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
  return model, params, loss_fn, grads, stats, x, y


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _nnx_problem():
  model = NnxMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 5))
  y = jax.random.normal(jax.random.key(2), (8, 3))
  loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  return model, loss_fn, x, y


def _close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# No statistics: the error names the Linen and the NNX routes.


def test_nnx_optimizer_without_stats_names_nnx_value_and_grad_and_optimizer_update():
  model, loss_fn, x, y = _nnx_problem()
  optimizer = nnx.Optimizer(model, eva_optax.eva(0.01), wrt=nnx.Param)
  _, grads = nnx.value_and_grad(loss_fn)(model, x, y)  # Flax's: no statistics
  with pytest.raises(ValueError, match="needs the layer statistics") as error:
    optimizer.update(model, grads)
  message = str(error.value)
  assert "Here nnx.Optimizer.update was called without stats=" in message
  assert "eva_optax.nnx_value_and_grad" in message
  assert "optimizer.update(model, grads, stats=stats)" in message


def test_tx_update_without_stats_names_both_routes(linen):
  _, params, _, grads, _, _, _ = linen
  tx = eva_optax.eva(0.01)
  with pytest.raises(ValueError, match="needs the layer statistics") as error:
    tx.update(grads, tx.init(params), params)
  message = str(error.value)
  for fix in (
    "eva_optax.value_and_grad(loss_fn)",
    "tx.update(grads, opt_state, params, stats=stats)",
    "eva_optax.nnx_value_and_grad(loss_fn)",
    "optimizer.update(model, grads, stats=stats)",
    "optax.MultiSteps inside optax.chain",
    "eva_optax.TrainState",
  ):
    assert fix in message


# ---------------------------------------------------------------------------
# The wrong front-end.


def test_linen_value_and_grad_on_an_nnx_model_names_nnx_value_and_grad():
  model, loss_fn, x, y = _nnx_problem()
  with pytest.raises(
    TypeError, match=r"got an NNX module \(NnxMLP\).*eva_optax\.nnx_value_and_grad"
  ):
    eva_optax.value_and_grad(loss_fn)(model, x, y)


def test_nnx_value_and_grad_on_linen_params_names_value_and_grad(linen):
  _, params, loss_fn, _, _, x, y = linen
  with pytest.raises(
    TypeError, match=r"must be an nnx.Module; got dict.*eva_optax\.value_and_grad"
  ):
    eva_optax.nnx_value_and_grad(loss_fn)(params, x, y)


# ---------------------------------------------------------------------------
# Wrappers that drop stats= the user did pass.


def test_multisteps_inside_chain_names_multisteps_outermost(linen):
  _, params, _, grads, stats, _, _ = linen
  multi = optax.MultiSteps(eva_optax.eva(0.01), every_k_schedule=2)
  tx = optax.chain(optax.clip_by_global_norm(1.0), multi)
  with pytest.raises(
    ValueError, match=r"Here optax\.MultiSteps .*Make MultiSteps the outermost wrapper"
  ):
    jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  # The fix the message names works: MultiSteps outermost, the chain inside it.
  inner = optax.chain(optax.clip_by_global_norm(1.0), eva_optax.eva(0.01))
  fixed = optax.MultiSteps(inner, every_k_schedule=2)
  state = fixed.init(params)
  for _ in range(2):
    updates, state = fixed.update(grads, state, params, stats=stats)
  assert int(state.gradient_step) == 1
  assert float(jnp.abs(updates["Dense_0"]["kernel"]).max()) > 0.0


def test_flax_train_state_names_eva_optax_train_state(linen):
  model, params, _, grads, stats, _, _ = linen
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=eva_optax.eva(0.01))
  named = r"Flax's flax\.training\.train_state\.TrainState.*Use eva_optax\.TrainState"
  with pytest.raises(ValueError, match=named):
    jax.jit(lambda s: s.apply_gradients(grads=grads, stats=stats))(state)


# ---------------------------------------------------------------------------
# A loss over the whole variables dict: said at the capture.


def test_whole_variables_dict_is_an_error_at_the_capture(linen):
  model, params, _, _, _, x, y = linen
  loss_fn = lambda variables, x, y: jnp.mean((model.apply(variables, x) - y) ** 2)
  with pytest.raises(ValueError, match=r"got the whole variables dict.*Pass variables\['params'\]"):
    eva_optax.value_and_grad(loss_fn)({"params": params}, x, y)


# ---------------------------------------------------------------------------
# argnums, as in jax.value_and_grad.


def test_linen_argnums_gives_the_argnums_0_result(linen):
  _, params, loss_fn, grads, stats, x, y = linen
  swapped = lambda x, p, y: loss_fn(p, x, y)
  loss1, grads1, stats1 = eva_optax.value_and_grad(swapped, argnums=1)(x, params, y)
  loss0, _ = jax.value_and_grad(swapped, argnums=1)(x, params, y)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  _close(grads1, grads)
  _close(stats1, stats)
  assert jax.tree.leaves(stats1)  # statistics, not an empty tree
  with pytest.raises(TypeError, match="argnums=2, but grad_fn got 2 positional"):
    eva_optax.value_and_grad(swapped, argnums=2)(x, params)
  with pytest.raises(TypeError, match="pass has_aux by name"):
    eva_optax.value_and_grad(swapped, True)
  with pytest.raises(TypeError, match="non-negative int"):
    eva_optax.value_and_grad(swapped, argnums=(0, 1))


def test_nnx_argnums_gives_the_argnums_0_result():
  model, loss_fn, x, y = _nnx_problem()
  loss0, grads0, stats0 = eva_optax.nnx_value_and_grad(loss_fn)(model, x, y)
  swapped = lambda x, m, y: loss_fn(m, x, y)
  loss1, grads1, stats1 = eva_optax.nnx_value_and_grad(swapped, argnums=1)(x, model, y)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  _close(nnx.to_pure_dict(grads1), nnx.to_pure_dict(grads0))
  _close(stats1, stats0)
  assert set(stats1) == {"hidden", "out"}


# ---------------------------------------------------------------------------
# Pass-through made visible: one warning per gradient function and set of modules.


class Upsampler(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(4)(x))  # Dense_0
    h = nn.ConvTranspose(2, (2,), strides=(2,), name="up")(h[:, :, None])  # (B, 8, 2)
    return nn.Dense(3)(h.reshape(h.shape[0], -1))  # Dense_1


def test_linen_pass_through_warns_once_naming_the_modules_and_describe():
  model = Upsampler()
  x = jax.random.normal(jax.random.key(1), (8, 5))
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  grad_fn = eva_optax.value_and_grad(loss_fn)
  named = r"passed through: up \(ConvTranspose\).*eva_optax\.describe"
  with pytest.warns(eva_optax.PassThroughWarning, match=named) as record:
    _, _, stats = jax.jit(grad_fn)(params, x)
  assert isinstance(stats["up"], eva_optax.PassThrough)
  assert len(record) == 1 and record[0].filename == __file__  # the user's line, not JAX's
  # Not again for the same gradient function: another trace, or an eager call.
  with warnings.catch_warnings():
    warnings.simplefilter("error", eva_optax.PassThroughWarning)
    jax.jit(grad_fn)(params, x[:4])
    grad_fn(params, x)
  # Silenced the usual way.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    warnings.filterwarnings("ignore", category=eva_optax.PassThroughWarning)
    eva_optax.value_and_grad(loss_fn)(params, x)
  assert not [w for w in caught if issubclass(w.category, eva_optax.PassThroughWarning)]


def test_nnx_pass_through_warns_once_naming_the_modules_and_describe():

  class NnxUpsampler(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.ConvTranspose(5, 2, (2,), strides=(2,), rngs=rngs)
      self.out = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.up(x))

  model = NnxUpsampler(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 3, 5))
  grad_fn = eva_optax.nnx_value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))
  named = r"nnx_value_and_grad: 1 module .*up \(ConvTranspose\).*eva_optax\.describe"
  with pytest.warns(eva_optax.PassThroughWarning, match=named):
    grad_fn(model, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error", eva_optax.PassThroughWarning)
    grad_fn(model, x)


def test_no_pass_through_no_warning(linen):
  _, params, loss_fn, _, _, x, y = linen
  with warnings.catch_warnings():
    warnings.simplefilter("error", eva_optax.PassThroughWarning)
    eva_optax.value_and_grad(loss_fn)(params, x, y)
