"""Parameters sharded the MaxText way: Eva at SGD's collectives, the state where the kernel is.

A decoder with Flax logical axis names (``examples.harness.sharded``) on 8 host
devices, under tensor parallelism (data 2 × model 4) and FSDP (data 8). Counted
in the compiled step, load-independent: the collectives each optimizer adds to
SGD's, at two depths (a per-layer collective would show as a slope); none of
them the size of an activation or a kernel. Then the numbers: three steps on
the mesh equal three on one device, and the state's shardings follow the
kernels.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eva_optax
from examples.harness import compiled_ops, sharded

DEVICES = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

VOCAB, D_MODEL, HEADS, MLP, SEQ, BATCH = 32, 128, 4, 256, 16, 64
MESHES = {"tp": (2, 4), "fsdp": (8, 1)}
OPTIMIZERS = {
    "sgd": (lambda: optax.sgd(0.1, momentum=0.9), None),
    "eva": (lambda: eva_optax.eva(0.1, weight_decay=1e-3), eva_optax.EVA_STATISTICS),
    "eva_foof": (lambda: eva_optax.eva_foof(0.1), eva_optax.EVA_FOOF_STATISTICS),
    "kfac": (lambda: eva_optax.kfac(0.1, inverse_every=2), eva_optax.KFAC_STATISTICS),
    # ε well above float32 rounding of the statistics: with a tiny ε the float32 roots of
    # nearly singular statistics amplify the order of the sums (2.4e-5 apart on FSDP at
    # the default 1e-6).
    "shampoo": (lambda: eva_optax.shampoo(0.1, damping=1e-4), None),
}
# A kernel, or an activation (batch × seq × width over 8 devices), is at least this large.
LARGE = D_MODEL * D_MODEL
assert BATCH * SEQ * D_MODEL // DEVICES >= LARGE


def _model(layers: int) -> sharded.Decoder:
  return sharded.Decoder(VOCAB, D_MODEL, HEADS, MLP, layers, max_len=SEQ)


def _tokens(seed: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ + 1)), jnp.int32)


def _step(model, name):
  make, statistics = OPTIMIZERS[name]
  tx = make()
  loss_fn = sharded.next_token_loss(model)

  def step(params, state, tokens):
    if statistics is None:
      grads = jax.grad(loss_fn)(params, tokens)
      updates, state = tx.update(grads, state, params)
    else:
      extra = {}
      if name == "kfac":
        extra["factors_due"] = eva_optax.factors_due(state)
      grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics)
      _, grads, stats = grad_fn(params, tokens, **extra)
      updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  return tx, step


@functools.lru_cache(maxsize=None)
def _setup(parallelism: str, layers: int, name: str):
  """The compiled step on the mesh, its params, state and shardings."""
  model = _model(layers)
  mesh = sharded.make_mesh(MESHES[parallelism])
  rules = sharded.RULES[parallelism]
  tokens = _tokens(0)
  tx, step = _step(model, name)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1])["params"]
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    init = lambda k: nn.unbox(model.init(k, tokens[:, :-1])["params"])
    params = jax.jit(init, out_shardings=param_shardings)(jax.random.key(0))
    state_shardings = eva_optax.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    batch = NamedSharding(mesh, P("data"))
    jitted = jax.jit(
        step,
        in_shardings=(param_shardings, state_shardings, batch),
        out_shardings=(param_shardings, state_shardings),
    )
    compiled = jitted.lower(params, state, tokens).compile()
  return dict(
      mesh=mesh, rules=rules, tx=tx, step=step, jitted=jitted, compiled=compiled, params=params,
      state=state, param_shardings=param_shardings, state_shardings=state_shardings, batch=batch,
  )


def _collectives(parallelism, layers, name):
  return compiled_ops.collectives(_setup(parallelism, layers, name)["compiled"])


def _extra(parallelism, layers, name) -> int:
  return len(_collectives(parallelism, layers, name)) - len(_collectives(parallelism, layers, "sgd"))


@pytest.mark.parametrize("parallelism", sorted(MESHES))
@pytest.mark.parametrize("name", ["eva", "eva_foof"])
def test_eva_adds_a_few_collectives_to_sgds_at_any_depth(parallelism, name):
  shallow, deep = _extra(parallelism, 1, name), _extra(parallelism, 2, name)
  assert 0 <= shallow <= 8
  assert deep == shallow  # no collective per layer
  # What Eva adds is vector-sized: the statistics (XLA reduces them with the gradients,
  # as it would a bias gradient), their gather and the packed per-layer sums. One kernel
  # or activation gathered would exceed it.
  for layers in (1, 2):
    volume = lambda n: sum(c.elements for c in _collectives(parallelism, layers, n))
    bound = _vector_bound(parallelism, layers, name)
    assert volume(name) - volume("sgd") <= bound < LARGE, (layers, volume(name) - volume("sgd"))


def _vector_bound(parallelism, layers, name) -> int:
  """What Eva's or Eva-f's step may add to SGD's traffic, in elements: Σ in (ā) and Σ out
  (ḡ) over the layers twice (reduced over the batch, then gathered whole from the state,
  where they are split over the devices), plus the packed sums: Eva 6 per layer; Eva-f Ĝā
  and the column norms (2 out per layer), the biases, ‖ā‖²."""
  state = _setup(parallelism, layers, "eva")["state"][0]
  inputs = sum(x.size for x in jax.tree.leaves(state.input_mean))
  outputs = sum(x.size for x in jax.tree.leaves(state.output_grad_mean))
  count = len(jax.tree.leaves(state.input_mean))
  if name == "eva":
    return 2 * (inputs + outputs) + 6 * count
  params = _setup(parallelism, layers, name)["params"]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  modules = {tuple(k[:-1]) for k, _ in flat if k[-1].key == "kernel"}
  biases = sum(x.size for k, x in flat if k[-1].key == "bias" and tuple(k[:-1]) in modules)
  return 2 * inputs + 2 * outputs + biases + count


def test_sgd_has_collectives_to_compare_with():
  # The comparison means something: SGD's step communicates on both meshes, and more
  # at depth 2 than at depth 1.
  for parallelism in MESHES:
    assert len(_collectives(parallelism, 2, "sgd")) > len(_collectives(parallelism, 1, "sgd")) > 0


def _run(setup, steps=3):
  params, state = setup["params"], setup["state"]
  with jax.default_matmul_precision("highest"):
    for s in range(steps):
      params, state = setup["jitted"](params, state, jax.device_put(_tokens(s + 1), setup["batch"]))
  return params


@functools.lru_cache(maxsize=None)
def _one_device(name: str, layers: int = 1):
  model = _model(layers)
  tokens = _tokens(0)
  tx, step = _step(model, name)
  params = nn.unbox(model.init(jax.random.key(0), tokens[:, :-1])["params"])
  state = tx.init(params)
  jitted = jax.jit(step)
  with jax.default_matmul_precision("highest"):
    for s in range(3):
      params, state = jitted(params, state, _tokens(s + 1))
  return params


@pytest.mark.parametrize("parallelism", sorted(MESHES))
@pytest.mark.parametrize("name", ["eva", "eva_foof", "kfac", "shampoo"])
def test_sharded_steps_equal_one_device(parallelism, name):
  got, want = _run(_setup(parallelism, 1, name)), _one_device(name)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w), np.linalg.norm(g - w) / np.linalg.norm(w)
  moved = max(
      float(np.abs(np.asarray(g) - np.asarray(w)).max())
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(_setup(parallelism, 1, name)["params"]))
  )
  assert moved > 1e-3  # the steps did something


def _spec(sharding) -> tuple:
  return tuple(sharding.spec) + (None,) * 4


@pytest.mark.parametrize("parallelism", sorted(MESHES))
def test_eva_statistics_follow_the_kernel(parallelism):
  setup = _setup(parallelism, 1, "eva")
  state = setup["state"][0]  # scale_by_eva's
  kernel = lambda m: setup["param_shardings"]["block0"][m]["kernel"]
  up, down = kernel("up"), kernel("down")
  axes = lambda e: () if e is None else tuple(e) if isinstance(e, tuple) else (e,)
  mesh = setup["mesh"]
  for field, kernel, dim in [
      ("input_mean", up, 0), ("output_grad_mean", up, 1),
      ("input_mean", down, 0), ("output_grad_mean", down, 1),
  ]:
    module = "up" if kernel is up else "down"
    got = axes(getattr(state, field)["block0"][module].sharding.spec[0])
    # Split like the kernel's axis first, then over the devices the kernel leaves.
    assert got[: len(axes(_spec(kernel)[dim]))] == axes(_spec(kernel)[dim]), (field, module, got)
    assert np.prod([mesh.shape[a] for a in got]) == DEVICES, (field, module, got)
  # The sharded axes are really sharded: TP shards the MLP's hidden units, FSDP the width.
  sharded_axis = {"tp": "model", "fsdp": "data"}[parallelism]
  assert sharded_axis in jax.tree.leaves([_spec(up), _spec(down)])
  # And the compiled step keeps them there (out_shardings = in_shardings, no re-sharding).
  _, after = setup["jitted"](setup["params"], setup["state"], jax.device_put(_tokens(1), setup["batch"]))
  same = jax.tree.map(
      lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), after, setup["state_shardings"]
  )
  assert jax.tree.all(same)


def _bytes(tree) -> tuple[int, int]:
  """Bytes over all devices, and the logical bytes."""
  leaves = jax.tree.leaves(tree)
  stored = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  return stored, sum(x.nbytes for x in leaves)


@pytest.mark.parametrize("parallelism", sorted(MESHES))
@pytest.mark.parametrize("name", ["eva", "eva_foof"])
def test_eva_state_on_no_more_devices_than_the_params(parallelism, name):
  setup = _setup(parallelism, 1, name)
  preconditioner = setup["state"][0]
  stored, logical = _bytes(preconditioner)
  p_stored, p_logical = _bytes(setup["params"])
  assert stored / logical <= p_stored / p_logical
  # Not trivially: FSDP shards the statistics of the layers it shards.
  if parallelism == "fsdp":
    assert stored / logical < DEVICES


@pytest.mark.parametrize(
    "name", ["eva", "eva_foof", "eva_shampoo", "kfac", "foof", "shampoo"]
)
def test_optax_tree_map_params_works_on_every_state(name):
  tx = getattr(eva_optax, name)(0.1)
  params = nn.unbox(_model(1).init(jax.random.key(0), _tokens(0)[:, :-1])["params"])
  state = jax.eval_shape(tx.init, params)
  specs = optax.tree_map_params(
      tx, lambda _, spec: spec, state, jax.tree.map(lambda _: P("x"), params),
      transform_non_params=lambda _: P(),
  )
  # A prefix of the state: every state leaf has its spec.
  jax.tree.map(lambda spec, _: spec, specs, state, is_leaf=lambda x: isinstance(x, P))
  # Trees shaped like the params (momentum) get the params' specs.
  with_momentum = optax.chain(tx, optax.trace(0.9))
  specs = optax.tree_map_params(
      with_momentum, lambda _, spec: spec, jax.eval_shape(with_momentum.init, params),
      jax.tree.map(lambda _: P("x"), params), transform_non_params=lambda _: P(),
  )
  assert P("x") in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


def test_maxtext_recipe_eval_shape_on_boxed_params():
  """``jax.eval_shape(tx.init, boxed)`` then ``nn.get_partition_spec``: the state's specs."""
  model = _model(1)
  boxed = jax.eval_shape(model.init, jax.random.key(0), _tokens(0)[:, :-1])["params"]
  tx = eva_optax.eva(0.1)
  specs = nn.get_partition_spec(jax.eval_shape(tx.init, boxed))
  assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
      jax.tree.map(lambda _: P(), jax.eval_shape(tx.init, nn.unbox(boxed))),
      is_leaf=lambda x: isinstance(x, P),
  )


def test_state_shardings_needs_the_params_shardings():
  params = {"kernel": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="shardings="):
    eva_optax.state_shardings(eva_optax.eva(0.1), params)
