"""The NNX capture (``eva_optax.nnx_value_and_grad``) against the Linen capture.

The Linen capture is checked against an independent reference in
``test_linen_capture.py``; here an NNX model and a Linen model with the same weights
(Conv with stride and SAME padding, Conv VALID without bias, LinearGeneral with
two input axes, Linear on a sequence, LinearGeneral with two output axes) must
give the same statistics, the same K-FAC factors and the same Eva steps
through ``nnx.Optimizer``. Then what only NNX has: gradients and state
updates as ``nnx.value_and_grad`` gives them, modules the capture does not
precondition (always a ``PassThrough``, never left out), stacks of layers made
with ``nnx.vmap`` and run with ``nnx.scan``, and ``axis_name`` under
``shard_map``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
from eva_optax import LayerStats, PassThrough
from eva_optax._src.statistics import STATISTICS
from eva_optax._src.statistics import layer_entries

RTOL = 1e-5
ATOL = 1e-8


# Tiny programs compiled once and run once: fewer XLA passes (conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compiles")


# ---------------------------------------------------------------------------
# The same network in NNX and in Linen.


class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (2, 2), padding="VALID", use_bias=False, rngs=rngs)
    self.general_in = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
    self.linear = nnx.Linear(8, 6, rngs=rngs)
    self.general_out = nnx.LinearGeneral(6, (2, 3), rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv1(x))  # (B, 3, 3, 4)
    h = nnx.relu(self.conv2(h))  # (B, 2, 2, 4)
    h = nnx.relu(self.general_in(h))  # (B, 2, 8)
    h = nnx.relu(self.linear(h))  # (B, 2, 6)
    return self.general_out(h)  # (B, 2, 2, 3)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv1")(x))
    h = nn.relu(nn.Conv(4, (2, 2), padding="VALID", use_bias=False, name="conv2")(h))
    h = nn.relu(nn.DenseGeneral(8, axis=(-2, -1), name="general_in")(h))
    h = nn.relu(nn.Dense(6, name="linear")(h))
    return nn.DenseGeneral((2, 3), name="general_out")(h)


def mse(y, target):
  return jnp.mean((y - target) ** 2)


def nnx_loss(model, x, target):
  return mse(model(x), target)


def linen_loss(params, x, target):
  return mse(LinenNet().apply({"params": params}, x), target)


@pytest.fixture(scope="module")
def problem():
  model = NnxNet(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  xs = jax.random.normal(jax.random.key(1), (3, 8, 6, 6, 2))
  targets = jax.random.normal(jax.random.key(2), (3, 8, 2, 2, 3))
  return model, params, xs, targets


def assert_stats_equal(nnx_stats, linen_stats, fields):
  linen_entries = layer_entries(linen_stats)
  nnx_entries = layer_entries(nnx_stats)
  assert set(nnx_entries) == set(linen_entries)
  for path, expected in linen_entries.items():
    got = nnx_entries[path]
    assert isinstance(got, LayerStats) and isinstance(expected, LayerStats), path
    assert (got.layout, got.has_bias) == (expected.layout, expected.has_bias), path
    for field in STATISTICS:
      value, want = getattr(got, field), getattr(expected, field)
      if field not in fields:
        assert value is None and want is None
        continue
      np.testing.assert_allclose(value, want, rtol=RTOL, atol=ATOL, err_msg=f"{path} {field}")


def test_model_is_the_linen_model(problem):
  model, params, xs, targets = problem
  np.testing.assert_allclose(
    nnx_loss(model, xs[0], targets[0]), linen_loss(params, xs[0], targets[0]), rtol=1e-6
  )


@pytest.mark.parametrize(
  "statistics",
  [eva_optax.EVA_STATISTICS, STATISTICS],
  ids=["eva", "eva+kfac_factors"],
)
def test_statistics_equal_the_linen_capture(problem, statistics):
  """ā, ḡ (and the K-FAC factors A, G) of every layer; loss and gradients too."""
  model, params, xs, targets = problem
  loss, grads, stats = eva_optax.nnx_value_and_grad(nnx_loss, statistics=statistics)(
    model, xs[0], targets[0]
  )
  ref_loss, ref_grads, ref_stats = eva_optax.value_and_grad(linen_loss, statistics=statistics)(
    params, xs[0], targets[0]
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7),
    nnx.to_pure_dict(grads),
    ref_grads,
  )
  assert_stats_equal(stats, ref_stats, statistics)
  kinds = {path: e.kind for path, e in layer_entries(stats).items()}
  assert kinds == {
    ("conv1",): "Conv",
    ("conv2",): "Conv",
    ("general_in",): "LinearGeneral",
    ("linear",): "Linear",
    ("general_out",): "LinearGeneral",
  }


def test_kfac_factors_gated_like_the_linen_capture(problem):
  """``factors_due=False``: A and G are zeros (not computed), ā and ḡ are not."""
  model, params, xs, targets = problem
  _, _, stats = eva_optax.nnx_value_and_grad(nnx_loss, statistics=STATISTICS)(
    model, xs[0], targets[0], factors_due=jnp.asarray(False)
  )
  _, _, ref = eva_optax.value_and_grad(linen_loss, statistics=STATISTICS)(
    params, xs[0], targets[0], factors_due=jnp.asarray(False)
  )
  assert_stats_equal(stats, ref, STATISTICS)
  for entry in layer_entries(stats).values():
    assert not np.any(entry.input_factor) and not np.any(entry.output_grad_factor)
    assert np.any(entry.input_mean)


def test_gradients_and_state_updates_as_nnx_value_and_grad():
  """``grads`` is what ``nnx.value_and_grad`` returns (an ``nnx.State`` of
  ``Param`` variables, same tree); BatchNorm statistics and RNG state reach the
  model; ``has_aux``; the model has no probe left afterwards."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)
      self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(self.dropout(self.norm(self.linear(x))))

  def loss_fn(model, x):
    y = model(x)
    return jnp.mean(y**2), y.shape

  x = jax.random.normal(jax.random.key(0), (5, 3))
  model, twin = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  (loss, aux), grads, stats = eva_optax.nnx_value_and_grad(loss_fn, has_aux=True)(model, x)
  (ref_loss, ref_aux), ref_grads = nnx.value_and_grad(loss_fn, has_aux=True)(twin, x)
  assert aux == ref_aux
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, ref_grads)
  raw = lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(twin))):
    np.testing.assert_array_equal(raw(a), raw(b))  # batch statistics, RNG state
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(twin))
  assert set(stats) == {"linear", "out"}


# ---------------------------------------------------------------------------
# Training with nnx.Optimizer.


def test_eva_steps_equal_the_linen_steps(problem):
  """Three Eva steps through ``nnx.Optimizer(...).update(model, grads,
  stats=stats)`` under ``nnx.jit`` give the parameters of the Linen loop."""
  model, params, xs, targets = problem
  model = nnx.clone(model)
  tx = eva_optax.eva(0.1, momentum=0.9, weight_decay=5e-4)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = eva_optax.nnx_value_and_grad(nnx_loss)

  @nnx.jit
  def nnx_step(model, optimizer, x, target):
    loss, grads, stats = grad_fn(model, x, target)
    optimizer.update(model, grads, stats=stats)
    return loss

  linen_grad_fn = eva_optax.value_and_grad(linen_loss)

  @jax.jit
  def linen_step(params, opt_state, x, target):
    loss, grads, stats = linen_grad_fn(params, x, target)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for x, target in zip(xs, targets):
    loss = nnx_step(model, optimizer, x, target)
    params, opt_state, ref_loss = linen_step(params, opt_state, x, target)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6),
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    params,
  )
  # The Eva state sized every layer (not only the momentum).
  eva_state = nnx.as_pure(optimizer.opt_state)[0]
  assert set(eva_state.input_mean) == set(params)
  assert int(eva_state.count) == 3


# ---------------------------------------------------------------------------
# What is not preconditioned is reported.


def test_unsupported_modules_are_pass_through():
  """Every module owning an ``nnx.Param`` kernel has an entry: unsupported
  kinds, LinearGeneral with batch_axis, Einsum equations with a repeated label and layers the
  loss does not call are ``PassThrough``; Eva then passes them through."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
      self.grouped = nnx.Conv(4, 4, (1, 1), feature_group_count=2, rngs=rngs)
      self.transpose = nnx.ConvTranspose(4, 2, (2, 2), rngs=rngs)
      self.einsum = nnx.Einsum("bhwc,cd->bhwd", (2, 3), (3,), rngs=rngs)
      self.diagonal = nnx.Einsum("bc,cc->bc", (3, 3), None, rngs=rngs)
      self.batched = nnx.LinearGeneral(3, 2, batch_axis={0: 5}, rngs=rngs)
      self.embed = nnx.Embed(4, 3, rngs=rngs)
      self.unused = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
      h = self.transpose(self.grouped(self.conv(x)))
      h = self.diagonal(self.einsum(h).mean(axis=(1, 2)))
      return self.batched(h) + self.embed(jnp.zeros(h.shape[0], jnp.int32)).sum()

  model = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (5, 4, 4, 2))
  loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
  _, grads, stats = eva_optax.nnx_value_and_grad(loss_fn)(model, x)
  entries = layer_entries(stats)
  assert isinstance(entries[("conv",)], LayerStats)
  assert isinstance(entries[("einsum",)], LayerStats) and entries[("einsum",)].kind == "Einsum"
  assert isinstance(entries[("grouped",)], LayerStats) and entries[("grouped",)].layout.groups == 2
  expected = {
    "transpose": ("ConvTranspose", "not a Linear, LinearGeneral, Conv or Einsum"),
    "diagonal": ("Einsum", "repeats a label"),
    "batched": ("LinearGeneral", "batch_axis"),
    "unused": ("Linear", "not called"),
  }
  for name, (kind, reason) in expected.items():
    entry = entries[(name,)]
    assert isinstance(entry, PassThrough), name
    assert entry.kind == kind and reason in entry.reason, (name, entry)
  assert ("embed",) not in entries  # no kernel: not a layer for any optimizer

  params = nnx.state(model, nnx.Param)
  rows = {r.parameter: r for r in eva_optax.describe(params, stats)}
  assert rows["conv/kernel"].rule == "preconditioned"
  for name in expected:
    assert rows[f"{name}/kernel"].rule == "pass-through"

  tx = optax.chain(eva_optax.scale_by_eva(learning_rate=0.1, layouts=eva_optax.layouts_of(stats)))
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  for name in expected:
    np.testing.assert_array_equal(updates[name]["kernel"][...], grads[name]["kernel"][...])


# ---------------------------------------------------------------------------
# Stacks of layers; many devices.


class Block(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return nnx.tanh(self.linear(x))


def test_scanned_stack_equals_the_unrolled_layers():
  """Layers stacked by ``nnx.vmap`` and run by ``nnx.scan``: per-layer
  statistics along the stack axis (layout with one stack axis), equal to those
  of the same layers called one after the other; a layer under ``nnx.remat``."""

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(rngs)

      self.blocks = make(rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, block):
        return block(x)

      return nnx.remat(lambda head, h: head(h))(self.head, body(x, self.blocks))

  class Unrolled(nnx.Module):
    def __init__(self, stack):
      kernel, bias = stack.blocks.linear.kernel[...], stack.blocks.linear.bias[...]
      self.blocks = nnx.List([Block(nnx.Rngs(0)) for _ in range(3)])
      for i, block in enumerate(self.blocks):
        block.linear.kernel[...] = kernel[i]
        block.linear.bias[...] = bias[i]
      self.head = stack.head

    def __call__(self, x):
      for block in self.blocks:
        x = block(x)
      return self.head(x)

  stack = Stack(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 4))
  loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
  grad_fn = eva_optax.nnx_value_and_grad(loss_fn, statistics=STATISTICS)
  _, _, stats = grad_fn(stack, x)
  _, _, ref = grad_fn(Unrolled(stack), x)
  assert_stats_equal({"head": stats["head"]}, {"head": ref["head"]}, STATISTICS)  # nnx.remat
  stacked = stats["blocks"]["linear"]
  assert stacked.layout == eva_optax.KernelLayout(1, 1)
  for i in range(3):
    for field in STATISTICS:
      np.testing.assert_allclose(
        getattr(stacked, field)[i],
        getattr(ref["blocks"][str(i)]["linear"], field),
        rtol=RTOL,
        atol=1e-7,
        err_msg=f"layer {i} {field}",
      )


def test_axis_name_gives_the_global_batch_statistics():
  """Under ``shard_map`` over 4 devices, with ``axis_name``: the statistics of
  the whole batch on one device."""
  devices = jax.devices()[:4]
  if len(devices) < 4:
    pytest.skip("needs 4 devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  model = nnx.Sequential(
    nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(5, 2, rngs=nnx.Rngs(1))
  )
  x = jax.random.normal(jax.random.key(0), (16, 3))
  loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
  _, _, ref = eva_optax.nnx_value_and_grad(loss_fn, statistics=STATISTICS)(model, x)
  graphdef, state = nnx.split(model)
  grad_fn = eva_optax.nnx_value_and_grad(loss_fn, statistics=STATISTICS, axis_name="data")

  def per_device(state, x):
    _, _, stats = grad_fn(nnx.merge(graphdef, state), x)
    return stats

  P = jax.sharding.PartitionSpec
  stats = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(
    state, x
  )
  assert_stats_equal(stats, ref, STATISTICS)


# ---------------------------------------------------------------------------
# Captured without patching classes: only the probed instances change.


def test_capture_changes_no_class_and_no_other_instance():
  """While ``grad_fn`` runs, ``nnx.Linear.__call__`` is still Flax's own, a
  Linear outside the model is not probed (and gets no statistics), and after
  it every layer of the model has its class back and no probe left."""
  rngs = nnx.Rngs(0)
  model = nnx.Linear(3, 2, rngs=rngs)
  outsider = nnx.Linear(2, 2, rngs=rngs)
  original_call = nnx.Linear.__dict__["__call__"]
  seen = {}

  def loss_fn(model, x):
    seen["class_call"] = nnx.Linear.__dict__["__call__"]
    seen["model_type"] = type(model)
    seen["outsider_type"] = type(outsider)
    return jnp.mean(outsider(model(x)) ** 2)

  x = jax.random.normal(jax.random.key(1), (4, 3))
  _, _, stats = eva_optax.nnx_value_and_grad(loss_fn)(model, x)
  assert seen["class_call"] is original_call
  assert seen["outsider_type"] is nnx.Linear
  assert seen["model_type"] is not nnx.Linear and issubclass(seen["model_type"], nnx.Linear)
  assert type(model) is nnx.Linear
  assert not [name for name in vars(model) if name.startswith("eva_probe")]
  assert isinstance(stats, LayerStats) and stats.kind == "Linear"
  np.testing.assert_allclose(stats.input_mean, np.asarray(x).mean(0), rtol=RTOL, atol=1e-7)


def test_subclass_overriding_call_is_passed_through_by_name():
  """A subclass of nnx.Linear with its own ``__call__`` computes something the
  statistics do not describe: a PassThrough naming it; a subclass that keeps
  Linear's ``__call__`` is captured."""

  class Scaled(nnx.Linear):
    def __call__(self, x):
      return 2.0 * super().__call__(x)

  class Plain(nnx.Linear):
    pass

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.scaled = Scaled(3, 4, rngs=rngs)
      self.plain = Plain(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.plain(self.scaled(x))

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  _, _, stats = eva_optax.nnx_value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))(model, x)
  assert isinstance(stats["scaled"], PassThrough)
  assert "Scaled overrides Linear.__call__" in stats["scaled"].reason
  assert isinstance(stats["plain"], LayerStats)
  h = np.asarray(model.scaled(x))
  np.testing.assert_allclose(stats["plain"].input_mean, h.mean(0), rtol=RTOL, atol=1e-6)
  assert type(model.scaled) is Scaled and type(model.plain) is Plain


def test_einsum_statistics_equal_the_linen_capture():
  """nnx.Einsum layers (a permuted kernel with bias, two contracted axes without)
  give the statistics and layouts of the same nn.Einsum layers."""

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.q = nnx.Einsum("BTD,NDH->BTNH", (3, 4, 5), (3, 5), rngs=rngs)
      self.o = nnx.Einsum("BTNH,NHD->BTD", (3, 5, 4), None, rngs=rngs)

    def __call__(self, x):
      return self.o(jnp.tanh(self.q(x)))

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = nn.Einsum((3, 4, 5), "BTD,NDH->BTNH", name="q")(x)
      return nn.Einsum((3, 5, 4), "BTNH,NHD->BTD", use_bias=False, name="o")(jnp.tanh(q))

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 6, 4))
  y = jax.random.normal(jax.random.key(1), (2, 6, 4))
  _, _, stats = eva_optax.nnx_value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  params = {
    "q": {"kernel": model.q.kernel[...], "bias": model.q.bias[...]},
    "o": {"kernel": model.o.kernel[...]},
  }
  linen_loss = lambda p: jnp.mean((Linen().apply({"params": p}, x) - y) ** 2)
  _, _, want = eva_optax.value_and_grad(linen_loss)(params)
  for name in ("q", "o"):
    assert stats[name].kind == "Einsum" and stats[name].layout == want[name].layout
    np.testing.assert_allclose(stats[name].input_mean, want[name].input_mean, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(
      stats[name].output_grad_mean, want[name].output_grad_mean, rtol=1e-5, atol=1e-9
    )


def test_grouped_conv_statistics_equal_the_linen_capture():
  """nnx.Conv with feature_group_count (grouped and depthwise) gives the
  per-group statistics and the layout of the same nn.Conv."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 4))
  for groups in (2, 4):
    layer = nnx.Conv(
      4, 6 if groups == 2 else 4, (3, 3), feature_group_count=groups, rngs=nnx.Rngs(0)
    )
    _, _, stats = eva_optax.nnx_value_and_grad(
      lambda m: jnp.mean(jnp.tanh(m(x)) ** 2), statistics=STATISTICS
    )(layer)
    linen = nn.Conv(layer.out_features, (3, 3), feature_group_count=groups)
    params = {"kernel": layer.kernel[...], "bias": layer.bias[...]}
    loss = lambda p: jnp.mean(jnp.tanh(linen.apply({"params": p}, x)) ** 2)
    _, _, want = eva_optax.value_and_grad(loss, statistics=STATISTICS)(params)
    assert stats.layout == want.layout and stats.layout.groups == groups
    for field in STATISTICS:
      np.testing.assert_allclose(getattr(stats, field), getattr(want, field), rtol=RTOL, atol=1e-9)


def test_sample_rows_factors_equal_the_linen_capture():
  """nnx_value_and_grad(factor_rows='samples') gives the Linen capture's
  per-sample A and G for the same layer and parameters (5 positions per sample)."""
  x = jax.random.normal(jax.random.key(0), (4, 5, 3))
  t = jax.random.normal(jax.random.key(1), (4, 5, 2))
  linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  statistics = ("input_factor", "output_grad_factor")
  _, _, got = eva_optax.nnx_value_and_grad(
    lambda m: jnp.mean((jnp.tanh(m(x)) - t) ** 2), statistics=statistics, factor_rows="samples"
  )(linear)
  dense = nn.Dense(2)
  params = {"kernel": linear.kernel[...], "bias": linear.bias[...]}
  _, _, want = eva_optax.value_and_grad(
    lambda p: jnp.mean((jnp.tanh(dense.apply({"params": p}, x)) - t) ** 2),
    statistics=statistics,
    factor_rows="samples",
  )(params)
  assert got.factor_rows == "samples"
  for field in statistics:
    np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-12)
