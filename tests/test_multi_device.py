"""Data parallelism: the same steps on 8 devices as on one, under jit and pmap/shard_map.

The eight shards of the batch are made to differ strongly (scaled and shifted
differently), so statistics averaged per shard instead of over the global batch
would fail these tests; a control run shows that they do differ.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eva_optax

DEVICES = 8
pytestmark = pytest.mark.skipif(
  jax.device_count() < DEVICES, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


MODEL = Net()
PER_DEVICE = 4
STEPS = 3


def loss_fn(params, x, y):
  return jnp.mean((MODEL.apply({"params": params}, x) - y) ** 2)


def _data(seed):
  rng = np.random.default_rng(seed)
  shard = np.arange(DEVICES, dtype=np.float32).repeat(PER_DEVICE)
  x = rng.normal(size=(DEVICES * PER_DEVICE, 6, 6, 2)).astype(np.float32)
  x = x * (1.0 + 0.5 * shard)[:, None, None, None] + 0.5 * shard[:, None, None, None]
  y = rng.normal(size=(DEVICES * PER_DEVICE, 3)).astype(np.float32) + 0.5 * shard[:, None]
  return jnp.asarray(x), jnp.asarray(y)


BATCHES = [_data(s) for s in range(STEPS)]
PARAMS = MODEL.init(jax.random.key(0), BATCHES[0][0][:1])["params"]

OPTIMIZERS = {
  "eva": (lambda: eva_optax.eva(0.02, weight_decay=1e-3), eva_optax.EVA_STATISTICS),
  "eva_foof": (lambda: eva_optax.eva_foof(0.02), eva_optax.EVA_FOOF_STATISTICS),
  "eva_shampoo": (lambda: eva_optax.eva_shampoo(0.02), None),
  "kfac": (lambda: eva_optax.kfac(0.02, inverse_every=2), eva_optax.KFAC_STATISTICS),
}


def _grads(statistics, axis_name=None):
  """``(params, x, y) -> (grads, stats)``; grads averaged over ``axis_name``."""
  if statistics is None:

    def fn(params, x, y):
      grads = jax.grad(loss_fn)(params, x, y)
      return (grads if axis_name is None else jax.lax.pmean(grads, axis_name)), None

    return fn
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics, axis_name=axis_name)

  def fn(params, x, y):
    _, grads, stats = grad_fn(params, x, y)
    return (grads if axis_name is None else jax.lax.pmean(grads, axis_name)), stats

  return fn


def _step(tx, grads_fn):
  def step(params, state, x, y):
    grads, stats = grads_fn(params, x, y)
    kw = {} if stats is None else {"stats": stats}
    updates, state = tx.update(grads, state, params, **kw)
    return optax.apply_updates(params, updates), state

  return step


def _single_device(name):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  step = jax.jit(_step(tx, _grads(statistics)))
  params, state = PARAMS, tx.init(PARAMS)
  for x, y in BATCHES:
    params, state = step(params, state, x, y)
  moved = max(
    float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(PARAMS))
  )
  assert 1e-4 < moved < 10.0, moved  # a real, bounded step
  return params


def _assert_close(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def _mesh():
  return Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_jit_with_sharded_batch_equals_one_device(name):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  mesh = _mesh()
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(PARAMS, replicated)
  state = jax.device_put(tx.init(PARAMS), replicated)
  step = jax.jit(_step(tx, _grads(statistics)))
  before = jax.tree.map(lambda a: a.sharding, state)
  for x, y in BATCHES:
    params, state = step(
      params, state, jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
    )
  _assert_close(params, _single_device(name))
  # The state keeps its shardings, and the step compiled once.
  after = jax.tree.map(lambda a: a.sharding, state)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.is_equivalent_to(b, 1), before, after))
  assert step._cache_size() == 1


def _pmap_run(name, axis_name="data"):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  step = jax.pmap(_step(tx, _grads(statistics, axis_name)), axis_name="data")
  replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES,) + a.shape), t)
  params, state = replicate(PARAMS), replicate(tx.init(PARAMS))
  shard = lambda a: a.reshape((DEVICES, PER_DEVICE) + a.shape[1:])
  for x, y in BATCHES:
    params, state = step(params, state, shard(x), shard(y))
  # Every replica holds the same parameters.
  for leaf in jax.tree.leaves(params):
    np.testing.assert_array_equal(leaf[0], leaf[-1])
  return jax.tree.map(lambda a: a[0], params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pmap_with_axis_name_equals_one_device(name):
  _assert_close(_pmap_run(name), _single_device(name))


@pytest.mark.parametrize("name", ["eva", "kfac"])
def test_shard_map_with_axis_name_equals_one_device(name):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  mesh = _mesh()
  grads_fn = _grads(statistics, "data")
  # Under shard_map the gradient for replicated (unvarying) params would come
  # back summed over the devices; per-device params give per-device gradients,
  # which _grads then averages, as under pmap.
  local = lambda p, x, y: grads_fn(jax.lax.pcast(p, "data", to="varying"), x, y)
  step = jax.jit(
    jax.shard_map(
      _step(tx, local),
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P()),
    )
  )
  params, state = PARAMS, tx.init(PARAMS)
  for x, y in BATCHES:
    params, state = step(params, state, x, y)
  _assert_close(params, _single_device(name))


@pytest.mark.parametrize("name", ["eva", "kfac"])
def test_per_shard_statistics_would_differ(name):
  """Control: without axis_name (statistics of one shard each), the result is
  not the single-device one, so the tests above can fail."""
  make, statistics = OPTIMIZERS[name]
  tx = make()
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics)

  def local_stats(params, x, y):
    _, grads, stats = grad_fn(params, x, y)
    return jax.lax.pmean(grads, "data"), stats

  step = jax.pmap(_step(tx, local_stats), axis_name="data")
  replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES,) + a.shape), t)
  params, state = replicate(PARAMS), replicate(tx.init(PARAMS))
  shard = lambda a: a.reshape((DEVICES, PER_DEVICE) + a.shape[1:])
  for x, y in BATCHES:
    params, state = step(params, state, shard(x), shard(y))
  want = _single_device(name)
  got = jax.tree.map(lambda a: a[0], params)
  worst = max(
    float(np.abs(np.asarray(g) - np.asarray(w)).max() / np.abs(np.asarray(w)).max())
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  )
  assert worst > 1e-3


def _fsdp_sharding(mesh, leaf):
  """Shard the first axis divisible by the device count, else replicate."""
  for axis, size in enumerate(leaf.shape):
    if size % DEVICES == 0:
      spec = [None] * leaf.ndim
      spec[axis] = "data"
      return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


@pytest.mark.parametrize("name", ["eva", "eva_shampoo", "kfac"])
def test_fsdp_sharded_params_keep_state_shardings(name):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  mesh = _mesh()
  param_shardings = jax.tree.map(functools.partial(_fsdp_sharding, mesh), PARAMS)
  params = jax.device_put(PARAMS, param_shardings)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(param_shardings))
  # init on abstract parameters: the state's shapes, then its shardings from jit.
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), PARAMS, param_shardings
  )
  shapes = jax.eval_shape(tx.init, abstract)
  state = tx.init(params)
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  # Moment buffers follow their parameters; the curvature state is replicated.
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
  before = jax.tree.map(lambda a: a.sharding, state)
  # With FSDP kernels, XLA would pick a sharded layout for some statistics
  # (ā of a kernel sharded on its input axis) if left free: the usual JAX
  # recipe, out_shardings from the state built by init, keeps the step to one
  # compilation and the state replicated.
  step = jax.jit(_step(tx, _grads(statistics)), out_shardings=(param_shardings, before))
  batch_sharding = NamedSharding(mesh, P("data"))
  for x, y in BATCHES:
    params, state = step(
      params, state, jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
    )
  after = jax.tree.map(lambda a: a.sharding, state)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.is_equivalent_to(b, 1), before, after))
  assert jax.tree.all(
    jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), params, param_shardings)
  )
  assert step._cache_size() == 1
  _assert_close(params, _single_device(name))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_init_on_shape_dtype_structs(name):
  """init takes abstract parameters (jax.ShapeDtypeStruct leaves) as well."""
  tx = OPTIMIZERS[name][0]()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), PARAMS)
  got, want = tx.init(abstract), tx.init(PARAMS)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)
