"""The SGD tail of every alias (``eva_optax._src.alias``): precondition → weight decay → momentum → learning rate."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src.alias import with_sgd


@pytest.mark.parametrize("nesterov", [False, True])
def test_with_sgd_is_the_chain(nesterov):
  scale = optax.scale(0.5)  # a stand-in preconditioner
  tail = with_sgd(scale, 0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
  chain = optax.chain(
    optax.scale(0.5),
    optax.add_decayed_weights(0.01),
    optax.sgd(0.1, momentum=0.9, nesterov=nesterov),
  )
  params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
  grads = [{"w": jnp.asarray([0.5, 0.5, -1.0])}, {"w": jnp.asarray([-1.0, 2.0, 0.0])}]
  p, q, s, t = params, params, tail.init(params), chain.init(params)
  for g in grads:
    u, s = tail.update(g, s, p)
    v, t = chain.update(g, t, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  np.testing.assert_allclose(p["w"], q["w"], rtol=1e-6)
  # The first step by hand: -η (0.5 g + λ w).
  u, _ = tail.update(grads[0], tail.init(params), params)
  want = -0.1 * (0.5 * grads[0]["w"] + 0.01 * params["w"]) * (1.9 if nesterov else 1.0)
  np.testing.assert_allclose(u["w"], want, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
  ],
)
def test_with_sgd_refuses_by_name(kwargs, name):
  args = dict(learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=0.0) | kwargs
  with pytest.raises(ValueError, match=name):
    with_sgd(optax.identity(), args.pop("learning_rate"), **args)
