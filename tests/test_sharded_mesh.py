"""Parameters sharded the MaxText way: Eva at SGD's collectives, the state where the kernel is.

A decoder with Flax logical axis names (``examples.harness.sharded``) on 8 host
devices, under tensor parallelism (data 2 × model 4) and FSDP (data 8). Also tensor
parallelism over all 8 devices (model 8), where nothing splits the batch. Counted
in the compiled step, load-independent: the collectives each optimizer adds to
SGD's, at two depths (a per-layer collective would show as a slope); none of
them the size of an activation or a kernel. Then where the state lives: its
shardings follow the kernels, and the optax recipes give them. That the steps
equal one device's is ``test_sharded_equality.py``.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import eva_optax
from examples.harness import compiled_ops
from sharded_setup import DEVICES, LARGE, model as _model, setup as _setup, tokens as _tokens

pytestmark = pytest.mark.skipif(
  jax.device_count() < DEVICES, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


def _collectives(parallelism, layers, name):
  return compiled_ops.collectives(_setup(parallelism, layers, name)["compiled"])


def _extra(parallelism, layers, name) -> int:
  return len(_collectives(parallelism, layers, name)) - len(
    _collectives(parallelism, layers, "sgd")
  )


# Eva-f's counts and the 1-D model mesh run in `make bench` (`pytest -m slow`), for suite time.
@pytest.mark.parametrize(
  "parallelism, name",
  [
    ("tp", "eva"),
    ("fsdp", "eva"),
    pytest.param("tp", "eva_foof", marks=pytest.mark.slow),
    pytest.param("fsdp", "eva_foof", marks=pytest.mark.slow),
    pytest.param("model", "eva", marks=pytest.mark.slow),
  ],
)
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
  for parallelism in ("tp", "fsdp"):
    assert len(_collectives(parallelism, 2, "sgd")) > len(_collectives(parallelism, 1, "sgd")) > 0


def _spec(sharding) -> tuple:
  return tuple(sharding.spec) + (None,) * 4


@pytest.mark.parametrize("parallelism", ["tp", "fsdp"])
def test_eva_statistics_follow_the_kernel(parallelism):
  setup = _setup(parallelism, 1, "eva")
  state = setup["state"][0]  # scale_by_eva's
  kernel = lambda m: setup["param_shardings"]["block0"][m]["kernel"]
  up, down = kernel("up"), kernel("down")
  axes = lambda e: () if e is None else tuple(e) if isinstance(e, tuple) else (e,)
  mesh = setup["mesh"]
  for field, kernel, dim in [
    ("input_mean", up, 0),
    ("output_grad_mean", up, 1),
    ("input_mean", down, 0),
    ("output_grad_mean", down, 1),
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
  _, after = setup["jitted"](
    setup["params"], setup["state"], jax.device_put(_tokens(1), setup["batch"])
  )
  same = jax.tree.map(
    lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), after, setup["state_shardings"]
  )
  assert jax.tree.all(same)


def _bytes(tree) -> tuple[int, int]:
  """Bytes over all devices, and the logical bytes."""
  leaves = jax.tree.leaves(tree)
  stored = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
  return stored, sum(x.nbytes for x in leaves)


@pytest.mark.parametrize("parallelism", ["tp", "fsdp"])
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
  "parallelism, name, decomposition",
  [
    ("tp", "kfac", "cholesky"),
    ("fsdp", "kfac", "cholesky"),
    ("tp", "foof", "cholesky"),
    ("tp", "shampoo", "eigh"),
    ("fsdp", "shampoo", "eigh"),
  ],
)
def test_matrix_states_split_over_the_devices(parallelism, name, decomposition):
  """K-FAC's and FOOF's factors and inverses, Shampoo's statistics and roots: rows split
  over the devices (A of a layer with a bias as its rows and its bias row), the state
  over all devices within 1.5x its logical size (8x if whole on every device); each
  inverse or root inside its owner's branch only. (FOOF shares K-FAC's skeleton: TP
  only; the ratio does not change with depth: ``benchmarks.sharded`` shows depth 2.)"""
  setup = _setup(parallelism, 1, name)
  stored, logical = _bytes(setup["state"][0])
  assert stored / logical <= 1.5, stored / logical
  # Every decomposition of the step runs inside once_per_mesh's op, in the branch
  # that only the layer's owner takes (test_once_per_mesh.py).
  ops = [
    m
    for m in re.findall(r'op_name="([^"]*)"', setup["compiled"].as_text())
    if f"jit({decomposition})" in m
  ]
  assert ops and all(m.startswith("tmp_xla_computation/cond/branch_1_fun/") for m in ops)


@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_matrices_whole_trade_memory_for_collectives(name):
  """``state_shardings(..., matrices='whole')``: the matrices on every device (the state
  several times its logical size), and fewer collectives a step than split: no gather
  of the inverses (roots) between refreshes; still each inverse computed once."""
  split, whole = _setup("tp", 1, name), _setup("tp", 1, name, matrices="whole")
  ratio = lambda setup: (lambda b: b[0] / b[1])(_bytes(setup["state"][0]))
  assert ratio(split) <= 1.5 < 4 <= ratio(whole)
  count = lambda setup: len(compiled_ops.collectives(setup["compiled"]))
  assert count(whole) < count(split)


@pytest.mark.parametrize("name", ["eva", "eva_foof", "eva_shampoo", "kfac", "foof", "shampoo"])
def test_optax_tree_map_params_works_on_every_state(name):
  tx = getattr(eva_optax, name)(0.1)
  params = nn.unbox(_model(1).init(jax.random.key(0), _tokens(0)[:, :-1])["params"])
  state = jax.eval_shape(tx.init, params)
  specs = optax.tree_map_params(
    tx,
    lambda _, spec: spec,
    state,
    jax.tree.map(lambda _: P("x"), params),
    transform_non_params=lambda _: P(),
  )
  # A prefix of the state: every state leaf has its spec.
  jax.tree.map(lambda spec, _: spec, specs, state, is_leaf=lambda x: isinstance(x, P))
  # Trees shaped like the params (momentum) get the params' specs.
  with_momentum = optax.chain(tx, optax.trace(0.9))
  specs = optax.tree_map_params(
    with_momentum,
    lambda _, spec: spec,
    jax.eval_shape(with_momentum.init, params),
    jax.tree.map(lambda _: P("x"), params),
    transform_non_params=lambda _: P(),
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


@pytest.mark.parametrize("make", [optax.adamw, optax.contrib.muon], ids=["adamw", "muon"])
def test_state_shardings_for_optax_optimizers(make):
  """optax's own optimizers, masked ones included: moments like the parameters."""
  compiled = _setup("tp", 1, "sgd")
  tx = make(1e-3)
  shardings = eva_optax.state_shardings(tx, compiled["params"])
  state = jax.jit(tx.init, out_shardings=shardings)(compiled["params"])
  kernel = compiled["param_shardings"]["block0"]["up"]["kernel"]
  found = [
    leaf.sharding
    for leaf in jax.tree.leaves(state)
    if leaf.shape == compiled["params"]["block0"]["up"]["kernel"].shape
  ]
  assert found and all(s.is_equivalent_to(kernel, 2) for s in found)
