"""Where the optimizer state lives (``eva_optax._src.sharding``): replicated on the parameters' mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_optax._src.sharding import params_mesh, replicate_on_params_mesh


def test_state_replicated_on_the_mesh_of_sharded_params():
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ("data",))
  kernel = jax.device_put(jnp.ones((len(devices) * 2, 3)), NamedSharding(mesh, P("data")))
  params = {"bias": jnp.zeros(3), "kernel": kernel}  # a plain array first: the sharded one is found
  assert params_mesh(params) == mesh
  state = {"count": jnp.zeros([], jnp.int32), "input_mean": jnp.arange(3.0)}
  placed = replicate_on_params_mesh(params, state)
  for leaf, before in zip(jax.tree.leaves(placed), jax.tree.leaves(state)):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
    assert leaf.sharding.is_fully_replicated
    np.testing.assert_array_equal(leaf, before)


def test_state_left_alone_without_a_mesh_or_under_tracing():
  state = {"input_mean": jnp.arange(3.0)}
  assert params_mesh({"kernel": jnp.ones((2, 3))}) is None
  assert replicate_on_params_mesh({"kernel": jnp.ones((2, 3))}, state) is state
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  params = {"kernel": jax.device_put(jnp.ones((2, 3)), NamedSharding(mesh, P()))}
  assert replicate_on_params_mesh(params, state) is not state  # placed, eagerly
  same = []
  jax.eval_shape(lambda s: same.append(replicate_on_params_mesh(params, s) is s) or s, state)
  assert same == [True]  # traced: left to the caller's shardings
  assert params_mesh(jax.ShapeDtypeStruct((2, 3), jnp.float32)) is None
