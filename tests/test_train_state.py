"""The Linen ``TrainState`` helper (``eva_optax._src.train_state``): ``apply_gradients``
forwards ``stats=`` to the optimizer, and is Flax's otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from models import TwoLayerMLP as MLP


def test_train_state_forwards_stats():
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jax.random.normal(jax.random.key(2), (16, 3))
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  tx = eva_optax.eva(0.1, weight_decay=1e-3)
  state = eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params)
  state = jax.jit(lambda s: s.apply_gradients(grads=grads, stats=stats))(state)
  updates, opt_state = tx.update(grads, tx.init(params), params, stats=stats)
  want = optax.apply_updates(params, updates)
  assert int(state.step) == 1
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), state.params, want
  )
  assert not np.allclose(state.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  # Gradient-only optimizers: no stats.
  plain = eva_optax.TrainState.create(
    apply_fn=model.apply, params=params, tx=eva_optax.eva_shampoo(0.1)
  )
  plain = plain.apply_gradients(grads=grads)
  assert int(plain.step) == 1
  # An optimizer that needs stats says so when they are missing.
  with pytest.raises(ValueError, match="stats"):
    eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx).apply_gradients(
      grads=grads
    )


def test_apply_gradients_without_stats_is_flaxs_step():
  """Without ``stats``: optax's own transformations; ``**kwargs`` replace other fields."""
  params = {"w": jnp.ones(3)}
  state = eva_optax.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.5))
  apply_fn = lambda variables, x: x
  state = state.apply_gradients(grads={"w": jnp.asarray([1.0, 0.0, -2.0])}, apply_fn=apply_fn)
  assert int(state.step) == 1 and state.apply_fn is apply_fn
  np.testing.assert_allclose(state.params["w"], [0.5, 1.0, 2.0])
