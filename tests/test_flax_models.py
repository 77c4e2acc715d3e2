"""Eva on models written the way Flax's own examples write them (DESIGN.md §6).

Each model trains for a few Eva steps with the capture call, ``stats=`` and
``tx.init(params)``, nothing else (no ``layouts=``), and each test asserts:

* the loss is finite at every step and lower after the steps than before
  (the same batch every step);
* ``describe(params, stats)`` reports every Dense / DenseGeneral / Conv /
  Einsum (NNX: Linear / LinearGeneral / Conv / Einsum) kernel and bias
  preconditioned, with no layouts hint, and every other parameter passed
  through;
* the captured ā and ḡ of the last step equal an independent computation
  from that step's parameters.

The independent computation never runs the library. For Linen models it runs
a plain forward pass with ``nn.intercept_methods``, records the raw input of
every Dense / DenseGeneral / Conv call and adds a zero perturbation to its
output; ``jax.grad`` w.r.t. the perturbations gives the per-sample output
gradients dL/dy. The means are then taken in float64 NumPy: Dense and
DenseGeneral rows in the kernel's input order, Conv im2col patches of the
batch-mean image extracted by explicit loops (per group of channels for a
grouped convolution), and every row set is checked against the kernel (the
layer is linear: row @ W is the output less the bias). For the NNX block the
reference is the block rewritten as a pure function of its parameters, whose
loss is checked equal to the model's. A module called several times (the
LSTM's gates, once per time step) has the mean of its per-call statistics.

Models: an ImageNet-style ResNet (``partial(nn.Conv, use_bias=False)``,
``BatchNorm(axis_name='batch')``, trained under ``jax.pmap`` on the 8 host
devices of conftest.py); a decoder-only transformer with
``nn.MultiHeadDotProductAttention(use_bias=False)`` and
``nn.with_logical_partitioning`` on its parameters; ``nn.RNN(nn.LSTMCell)``;
a Gemma-style NNX block (``nnx.Einsum`` projections, ``nnx.Linear`` MLP,
through ``nnx.Optimizer``); a MobileNet-style inverted residual block with a
depthwise convolution and BatchNorm.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils, nnx

import eva_optax
from eva_optax import LayerStats, PassThrough

RTOL = 2e-4  # float32 capture against float64 NumPy means of float32 records
FLOOR = 1e-8  # absolute floor, for statistics that vanish (ḡ of a Conv before BatchNorm)
STEPS = 4

# Tiny programs compiled once and run once: fewer XLA passes (conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compiles")


# ---------------------------------------------------------------------------
# Independent reference for Linen models.

_LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _is_layer_call(ctx) -> bool:
  return ctx.method_name == "__call__" and type(ctx.module) in _LINEN_LAYERS


def _lookup(tree, path):
  for key in path:
    if tree is None or key not in tree:
      return None
    tree = tree[key]
  return tree


def _pads(padding, sizes, window, strides):
  """Flax's zero padding of each spatial axis, written out by hand."""
  if padding == "VALID":
    return [(0, 0)] * len(sizes)
  if padding == "SAME":
    pads = []
    for size, k, s in zip(sizes, window, strides):
      total = max((-(-size // s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    return pads
  if isinstance(padding, int):
    return [(padding, padding)] * len(sizes)
  return [tuple(p) for p in padding]


def _patches(images, window, strides, padding):
  """im2col by loops: ``(batch, positions, *window, channels)``, HWIO order."""
  pads = _pads(padding, images.shape[1:-1], window, strides)
  images = np.pad(images, [(0, 0)] + pads + [(0, 0)])
  out = [(n - k) // s + 1 for n, k, s in zip(images.shape[1:-1], window, strides)]
  patches = np.zeros((images.shape[0], math.prod(out)) + tuple(window) + images.shape[-1:])
  for p, o in enumerate(np.ndindex(*out)):
    at = tuple(slice(i * s, i * s + k) for i, s, k in zip(o, strides, window))
    patches[:, p] = images[(slice(None),) + at]
  return patches


def _conv_stats(module, x, y, kernel, bias, dy):
  """ā, ḡ of one Conv call, per group (stack axis first) when grouped."""
  window = tuple(module.kernel_size)
  n = len(window)
  strides = (
    (module.strides,) * n if isinstance(module.strides, int) else tuple(module.strides or (1,) * n)
  )
  assert module.input_dilation in (None, 1) and module.kernel_dilation in (None, 1)
  assert x.ndim == n + 2  # one batch axis
  groups = module.feature_group_count
  patches = _patches(x, window, strides, module.padding)
  mean_patches = _patches(x.mean(0, keepdims=True), window, strides, module.padding)[0]
  out_rows = (y - bias).reshape(-1, y.shape[-1])
  dy_rows = dy.reshape(-1, dy.shape[-1])
  per_in, per_out = x.shape[-1] // groups, y.shape[-1] // groups
  a, g = [], []
  for i in range(groups):
    ins, outs = slice(i * per_in, (i + 1) * per_in), slice(i * per_out, (i + 1) * per_out)
    rows = patches[..., ins].reshape(-1, math.prod(window) * per_in)
    w = kernel[..., outs].reshape(rows.shape[1], per_out)
    # The layer is linear: the reference's patches (padding, HWIO order,
    # groups) must give Flax's own output.
    np.testing.assert_allclose(rows @ w, out_rows[:, outs], rtol=1e-4, atol=1e-5)
    a.append(mean_patches[..., ins].reshape(-1, rows.shape[1]).mean(0))
    g.append(dy_rows[:, outs].mean(0))
  if groups == 1:
    return a[0], g[0]
  return np.stack(a), np.stack(g)


def _dense_stats(module, x, y, kernel, bias, dy):
  """ā, ḡ of one Dense / DenseGeneral call: rows over the non-contracted axes."""
  if isinstance(module, nn.DenseGeneral):
    assert tuple(module.batch_dims) == ()
    axis = sorted(a % x.ndim for a in np.atleast_1d(module.axis))  # Flax sorts them
    rest = [a for a in range(x.ndim) if a not in axis]
    rows = np.transpose(x, rest + axis).reshape(-1, math.prod(x.shape[a] for a in axis))
  else:
    rows = x.reshape(-1, x.shape[-1])
  out_dim = kernel.size // rows.shape[1]
  np.testing.assert_allclose(
    rows @ kernel.reshape(rows.shape[1], out_dim),
    (y - bias).reshape(-1, out_dim),
    rtol=1e-4,
    atol=1e-5,
  )
  return rows.mean(0), dy.reshape(-1, out_dim).mean(0)


def linen_reference(
  loss_fn: Callable, params, *args, has_aux: bool = False, axis_name: str | None = None
):
  """``(loss, {module path: (ā, ḡ)}, {module path: module type})`` without the library.

  ``loss_fn(params, *args)`` is run as written; ``axis_name``: an axis the
  model reduces over (BatchNorm under ``pmap``), bound here with size 1, so
  the whole batch is one device's.
  """

  def bind(fn):
    if axis_name is None:
      return fn
    vmapped = jax.vmap(fn, in_axes=None, axis_name=axis_name, axis_size=1)
    return lambda *a: jax.tree.map(lambda v: v[0], vmapped(*a))

  shapes = []

  def shape_interceptor(next_fun, a, kw, ctx):
    y = next_fun(*a, **kw)
    if _is_layer_call(ctx):
      shapes.append(jax.ShapeDtypeStruct(y.shape, y.dtype))
    return y

  with nn.intercept_methods(shape_interceptor):
    jax.eval_shape(bind(lambda p: loss_fn(p, *args)), params)

  calls = []

  def perturbed(eps, params):
    records = []
    calls.clear()

    def interceptor(next_fun, a, kw, ctx):
      if not _is_layer_call(ctx):
        return next_fun(*a, **kw)
      x = a[0] if a else kw["inputs"]
      y = next_fun(*a, **kw)
      calls.append((tuple(ctx.module.scope.path), ctx.module))
      records.append((x, y))
      return y + eps[len(records) - 1]

    with nn.intercept_methods(interceptor):
      out = loss_fn(params, *args)
    loss = out[0] if has_aux else out
    return loss, (loss, records)

  eps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  dys, (loss, records) = jax.jit(bind(jax.grad(perturbed, has_aux=True)))(eps, params)
  assert len(calls) == len(shapes)

  per_path: dict[tuple[str, ...], list] = {}
  kinds = {}
  for (path, module), (x, y), dy in zip(calls, records, dys):
    kernel = np.asarray(_lookup(params, path + ("kernel",)), np.float64)
    bias = _lookup(params, path + ("bias",))
    bias = 0.0 if bias is None else np.asarray(bias, np.float64)
    x, y, dy = (np.asarray(v, np.float64) for v in (x, y, dy))
    stats = (_conv_stats if isinstance(module, nn.Conv) else _dense_stats)(
      module, x, y, kernel, bias, dy
    )
    per_path.setdefault(path, []).append(stats)
    kinds[path] = type(module)
  means = {p: tuple(np.mean(v, 0) for v in zip(*s)) for p, s in per_path.items()}
  return float(loss), means, kinds


# ---------------------------------------------------------------------------
# Checks shared by every model.


def _entries(stats) -> dict[tuple[str, ...], Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
    stats, is_leaf=lambda s: isinstance(s, (LayerStats, PassThrough))
  )[0]
  return {
    tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keys): v for keys, v in leaves
  }


def _close(got, want, what):
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape, what
  np.testing.assert_allclose(
    got, want, rtol=RTOL, atol=RTOL * np.abs(want).max() + FLOOR, err_msg=str(what)
  )


def assert_statistics(stats, want: dict):
  """Every captured layer is a reference layer and its ā, ḡ equal the reference's."""
  entries = _entries(stats)
  assert not [p for p, e in entries.items() if isinstance(e, PassThrough)]
  got = {p: e for p, e in entries.items() if isinstance(e, LayerStats)}
  assert set(got) == set(want)
  for path, (a, g) in want.items():
    _close(got[path].input_mean, a, (path, "ā"))
    _close(got[path].output_grad_mean, g, (path, "ḡ"))


def assert_described(params, stats, layer_paths: set):
  """describe: kernel and bias of every layer preconditioned (no layouts
  hint), every other parameter passed through."""
  rows = eva_optax.describe(params, stats)
  seen = set()
  for row in rows:
    *module, name = row.parameter.split("/")
    module = tuple(module)
    if module in layer_paths and name in ("kernel", "bias"):
      assert row.rule == "preconditioned", row
      assert "layouts" not in row.detail, row
      seen.add(module)
    else:
      assert row.rule == "pass-through", row
  assert seen == layer_paths


def assert_trained(losses):
  assert len(losses) == STEPS + 1 and np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def _images(seed, shape, classes):
  rng = np.random.default_rng(seed)
  offset = rng.uniform(-1.0, 1.0, size=shape[-1:])  # a channel-dependent mean
  x = (rng.normal(size=shape) + offset).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(rng.integers(0, classes, size=shape[0]))


# ---------------------------------------------------------------------------
# ImageNet-style ResNet under pmap.


class ResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  num_classes: int
  num_filters: int = 8

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name="batch"
    )
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(
          self.num_filters * 2**i, conv=conv, norm=norm, act=nn.relu, strides=strides
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def test_imagenet_resnet_under_pmap():
  """Global statistics (``axis_name='batch'``) on 8 devices equal those of
  the whole batch on one: the BatchNorm's batch statistics, the loss and ā,
  ḡ of every Conv and of the head."""
  devices = jax.local_device_count()
  assert devices == 8
  model = ResNet(stage_sizes=(1, 1), num_classes=5)
  images, labels = _images(0, (16, 16, 16, 3), 5)
  variables = model.init(jax.random.key(0), images[:2])
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = eva_optax.eva(0.05, momentum=0.9, weight_decay=1e-4)

  def loss_fn(params, batch_stats, images, labels):
    logits, new_state = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_state["batch_stats"]

  grad_fn = eva_optax.value_and_grad(loss_fn, has_aux=True, axis_name="batch")

  def train_step(params, batch_stats, opt_state, images, labels):
    (loss, new_batch_stats), grads, stats = grad_fn(params, batch_stats, images, labels)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    return params, new_batch_stats, opt_state, jax.lax.pmean(loss, "batch"), stats

  p_step = jax.pmap(train_step, axis_name="batch")
  shard = lambda a: a.reshape((devices, -1) + a.shape[1:])
  state = jax_utils.replicate((params, batch_stats, tx.init(params)))
  losses = []
  for _ in range(STEPS + 1):
    last = jax_utils.unreplicate(state[:2])
    *state, loss, stats = p_step(*state, shard(images), shard(labels))
    losses.append(float(loss[0]))
  assert_trained(losses)

  # Every device holds the same global statistics: those of the whole batch.
  for leaf in jax.tree.leaves(stats):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  stats = jax_utils.unreplicate(stats)
  want_loss, want, kinds = linen_reference(
    loss_fn, last[0], last[1], images, labels, has_aux=True, axis_name="batch"
  )
  np.testing.assert_allclose(losses[-1], want_loss, rtol=1e-5)
  assert sum(k is nn.Conv for k in kinds.values()) == 6 and set(kinds.values()) == {
    nn.Conv,
    nn.Dense,
  }
  assert_statistics(stats, want)
  assert_described(last[0], stats, set(want))


# ---------------------------------------------------------------------------
# Decoder-only transformer: bias-free attention, logical partitioning metadata.


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    kernel = nn.initializers.xavier_uniform()
    bias = nn.initializers.normal(stddev=1e-2)
    y = nn.Dense(
      self.mlp_dim,
      kernel_init=_partitioned(kernel, ("embed", "mlp")),
      bias_init=_partitioned(bias, ("mlp",)),
    )(x)
    y = nn.gelu(y)
    return nn.Dense(
      x.shape[-1],
      kernel_init=_partitioned(kernel, ("mlp", "embed")),
      bias_init=_partitioned(bias, ("embed",)),
    )(y)


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, mask):
    norm = partial(
      nn.LayerNorm,
      scale_init=_partitioned(nn.initializers.ones, ("embed",)),
      bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
    )
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=_partitioned(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
      use_bias=False,
      deterministic=True,
    )(norm()(x), mask=mask)
    x = x + y
    return x + MlpBlock(self.mlp_dim)(norm()(x))


class Decoder(nn.Module):
  vocab_size: int
  max_len: int
  emb_dim: int = 8
  num_heads: int = 2
  mlp_dim: int = 12
  num_layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(
      self.vocab_size,
      self.emb_dim,
      embedding_init=_partitioned(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
    )
    pos = self.param(
      "pos_embedding",
      _partitioned(nn.initializers.normal(stddev=0.02), ("length", "embed")),
      (self.max_len, self.emb_dim),
    )
    x = embed(tokens) + pos[None, : tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_dim, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(
      scale_init=_partitioned(nn.initializers.ones, ("embed",)),
      bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
    )(x)
    return nn.Dense(
      self.vocab_size,
      kernel_init=_partitioned(nn.initializers.xavier_uniform(), ("embed", "vocab")),
      bias_init=_partitioned(nn.initializers.zeros, ("vocab",)),
      name="logitdense",
    )(x)


def _train_linen(loss_fn, params, tx, args, has_aux=False):
  """STEPS + 1 Eva steps on the same batch: the losses, and the parameters
  and statistics of the last step."""
  grad_fn = eva_optax.value_and_grad(loss_fn, has_aux=has_aux)

  @jax.jit
  def step(params, opt_state, *args):
    loss, grads, stats = grad_fn(params, *args)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss, stats

  opt_state = tx.init(params)
  losses = []
  for _ in range(STEPS + 1):
    last = params
    params, opt_state, loss, stats = step(params, opt_state, *args)
    losses.append(float(loss[0] if has_aux else loss))
  return losses, last, stats


def _decoder_problem():
  model = Decoder(vocab_size=11, max_len=6)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 11, size=(4, 7)))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  variables = model.init(jax.random.key(0), inputs)

  def loss_fn(params, inputs, targets):
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return variables, loss_fn, inputs, targets


def test_decoder_transformer_with_bias_free_attention_and_logical_partitioning():
  variables, loss_fn, inputs, targets = _decoder_problem()
  # The metadata is there: every parameter is boxed with its logical axes.
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["block_0"]["MultiHeadDotProductAttention_0"]["query"][
    "kernel"
  ] == jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert specs["logitdense"]["bias"] == jax.sharding.PartitionSpec("vocab")
  params = nn.unbox(variables["params"])  # as Flax's examples hand params to optax
  losses, last, stats = _train_linen(
    loss_fn, params, eva_optax.eva(0.05, momentum=0.9), (inputs, targets)
  )
  assert_trained(losses)

  want_loss, want, kinds = linen_reference(loss_fn, last, inputs, targets)
  np.testing.assert_allclose(losses[-1], want_loss, rtol=1e-5)
  attention = [p for p in want if "MultiHeadDotProductAttention_0" in p]
  assert len(attention) == 8 and all(kinds[p] is nn.DenseGeneral for p in attention)
  assert len(want) == 13  # 2 × (q, k, v, out, 2 Dense) + logits
  assert_statistics(stats, want)
  assert_described(last, stats, set(want))


def test_decoder_transformer_with_boxed_params():
  """The parameters as ``model.init`` returns them, still boxed in
  ``nn.LogicallyPartitioned`` (optax and ``model.apply`` take them so)."""
  variables, loss_fn, inputs, targets = _decoder_problem()
  params = variables["params"]
  losses, last, stats = _train_linen(
    loss_fn, params, eva_optax.eva(0.05, momentum=0.9), (inputs, targets)
  )
  assert_trained(losses)
  assert isinstance(
    last["logitdense"]["kernel"], nn.LogicallyPartitioned
  )  # still boxed after the steps
  _, want, _ = linen_reference(loss_fn, nn.unbox(last), inputs, targets)
  assert_statistics(stats, want)
  assert_described(last, stats, set(want))


# ---------------------------------------------------------------------------
# nn.RNN over an nn.LSTMCell.


class LSTMModel(nn.Module):
  hidden: int = 6
  outputs: int = 3

  @nn.compact
  def __call__(self, xs):
    ys = nn.RNN(nn.LSTMCell(self.hidden))(xs)
    return nn.Dense(self.outputs, name="head")(ys)


class UnrolledLSTMModel(nn.Module):
  """LSTMModel with the cell called once per time step in a Python loop: the
  same parameter tree (nn.RNN binds its cell to the enclosing module, as
  ``LSTMCell_0``), no lifted transform."""

  hidden: int = 6
  outputs: int = 3

  @nn.compact
  def __call__(self, xs):
    cell = nn.LSTMCell(self.hidden)
    carry = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
    ys = []
    for t in range(xs.shape[1]):
      carry, y = cell(carry, xs[:, t])
      ys.append(y)
    return nn.Dense(self.outputs, name="head")(jnp.stack(ys, axis=1))


def test_rnn_lstm():
  """The eight gate Dense layers (``ii``… without bias on the input,
  ``hi``… with bias on the hidden state) are called once per time step inside
  ``nn.RNN``'s scan: the mean of their per-step statistics."""
  model, unrolled = LSTMModel(), UnrolledLSTMModel()
  rng = np.random.default_rng(2)
  xs = jnp.asarray((rng.normal(size=(4, 5, 3)) + [0.5, -1.0, 0.2]).astype(np.float32))
  ys = jnp.asarray(rng.normal(size=(4, 5, 3)).astype(np.float32))
  params = model.init(jax.random.key(0), xs)["params"]
  mse_of = lambda m: lambda p, xs, ys: jnp.mean((m.apply({"params": p}, xs) - ys) ** 2)
  np.testing.assert_allclose(
    mse_of(unrolled)(params, xs, ys), mse_of(model)(params, xs, ys), rtol=1e-6
  )

  losses, last, stats = _train_linen(
    mse_of(model), params, eva_optax.eva(0.1, momentum=0.9), (xs, ys)
  )
  assert_trained(losses)
  want_loss, want, _ = linen_reference(mse_of(unrolled), last, xs, ys)
  np.testing.assert_allclose(losses[-1], want_loss, rtol=1e-5)
  gates = {p[-1] for p in want if p[0] == "LSTMCell_0"}
  assert gates == {"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"} and len(want) == 9
  assert_statistics(stats, want)
  assert_described(last, stats, set(want))


# ---------------------------------------------------------------------------
# MobileNet-style inverted residual block: depthwise convolution, BatchNorm.


class InvertedResidual(nn.Module):
  expand: int = 2

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    channels = x.shape[-1]
    hidden = channels * self.expand
    y = nn.relu6(norm()(conv(hidden, (1, 1), name="expand")(x)))
    y = conv(hidden, (3, 3), padding="SAME", feature_group_count=hidden, name="depthwise")(y)
    y = nn.relu6(norm()(y))
    y = norm()(conv(channels, (1, 1), name="project")(y))
    return x + y


class MobileNetStyle(nn.Module):
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, name="stem")(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = InvertedResidual(name="block")(x, train)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def test_mobilenet_block_with_depthwise_convolution():
  """The depthwise Conv is a stack of one layer per channel: ā of shape
  (channels, 9), from each channel's patches, and ḡ (channels, 1)."""
  model = MobileNetStyle()
  images, labels = _images(3, (6, 8, 8, 3), 4)
  variables = model.init(jax.random.key(0), images)

  def loss_fn(params, batch_stats, images, labels):
    logits, new_state = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

  params = variables["params"]
  losses, last, stats = _train_linen(
    loss_fn,
    params,
    eva_optax.eva(0.05, momentum=0.9),
    (variables["batch_stats"], images, labels),
    has_aux=True,
  )
  assert_trained(losses)
  want_loss, want, kinds = linen_reference(
    loss_fn, last, variables["batch_stats"], images, labels, has_aux=True
  )
  np.testing.assert_allclose(losses[-1], want_loss, rtol=1e-5)
  assert want[("block", "depthwise")][0].shape == (8, 9) and want[("block", "depthwise")][
    1
  ].shape == (8, 1)
  assert len(want) == 5
  assert_statistics(stats, want)
  assert_described(last, stats, set(want))


# ---------------------------------------------------------------------------
# Gemma-style NNX block: Einsum projections, Linear MLP, nnx.Optimizer.

D, N, K, H, F, V = 8, 6, 3, 2, 12, 13  # model, query heads, kv heads, head dim, MLP, vocabulary


class RMSNorm(nnx.Module):
  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6) * (1 + self.scale[...])


class Attention(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (N, D, H), rngs=rngs)
    self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), rngs=rngs)

  def __call__(self, x):
    q = self.q_einsum(x) * H**-0.5
    k, v = self.kv_einsum(x)
    return self.attn_vec_einsum(_attend(q, k, v))


def _attend(q, k, v):
  """Grouped-query causal attention: each of the K kv heads serves N // K query heads."""
  k, v = jnp.repeat(k, N // K, axis=-2), jnp.repeat(v, N // K, axis=-2)
  logits = jnp.einsum("BTNH,BSNH->BTNS", q, k)
  t = q.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))[None, :, None, :]
  probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
  return jnp.einsum("BTNS,BSNH->BTNH", probs, v)


class FeedForward(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.gate = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.gate(x)) * self.up(x))


class GemmaStyle(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embedder = nnx.Embed(V, D, rngs=rngs)
    self.pre_attention_norm = RMSNorm(D)
    self.attn = Attention(rngs)
    self.pre_ffw_norm = RMSNorm(D)
    self.mlp = FeedForward(rngs)
    self.final_norm = RMSNorm(D)

  def __call__(self, tokens):
    x = self.embedder(tokens) * jnp.sqrt(D)
    x = x + self.attn(self.pre_attention_norm(x))
    x = x + self.mlp(self.pre_ffw_norm(x))
    return self.embedder.attend(self.final_norm(x))  # tied embedding


def _gemma_reference(p, tokens, targets):
  """The block as a pure function of its parameters: the loss, and per layer
  (input, dL/dy) by additive zero perturbations of every output."""
  norm = lambda x, s: x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6) * (1 + s)
  b, t = tokens.shape

  def loss(eps):
    inputs = {}
    x = p["embedder"]["embedding"][tokens] * jnp.sqrt(D)
    h = inputs["attn/q_einsum"] = inputs["attn/kv_einsum"] = norm(
      x, p["pre_attention_norm"]["scale"]
    )
    q = jnp.einsum("BTD,NDH->BTNH", h, p["attn"]["q_einsum"]["kernel"]) + eps["attn/q_einsum"]
    k, v = (
      jnp.einsum("BSD,CKDH->CBSKH", h, p["attn"]["kv_einsum"]["kernel"]) + eps["attn/kv_einsum"]
    )
    enc = inputs["attn/attn_vec_einsum"] = _attend(q * H**-0.5, k, v)
    x = (
      x
      + jnp.einsum("BTNH,NHD->BTD", enc, p["attn"]["attn_vec_einsum"]["kernel"])
      + eps["attn/attn_vec_einsum"]
    )
    h = inputs["mlp/gate"] = inputs["mlp/up"] = norm(x, p["pre_ffw_norm"]["scale"])
    gate = h @ p["mlp"]["gate"]["kernel"] + eps["mlp/gate"]
    up = h @ p["mlp"]["up"]["kernel"] + eps["mlp/up"]
    m = inputs["mlp/down"] = jax.nn.gelu(gate) * up
    x = x + m @ p["mlp"]["down"]["kernel"] + eps["mlp/down"]
    logits = norm(x, p["final_norm"]["scale"]) @ p["embedder"]["embedding"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), inputs

  eps = {
    "attn/q_einsum": jnp.zeros((b, t, N, H)),
    "attn/kv_einsum": jnp.zeros((2, b, t, K, H)),
    "attn/attn_vec_einsum": jnp.zeros((b, t, D)),
    "mlp/gate": jnp.zeros((b, t, F)),
    "mlp/up": jnp.zeros((b, t, F)),
    "mlp/down": jnp.zeros((b, t, D)),
  }
  (value, inputs), dys = jax.value_and_grad(loss, has_aux=True)(eps)
  return (
    float(value),
    {k: np.asarray(v, np.float64) for k, v in inputs.items()},
    {k: np.asarray(v, np.float64) for k, v in dys.items()},
  )


def _gemma_statistics(p, inputs, dys):
  """ā, ḡ per layer: rows over (B, T), the input and output axes in the
  kernel's order; each row set checked against the kernel."""
  rows = lambda a, n: a.reshape(-1, n)
  in_rows = {
    "attn/q_einsum": rows(inputs["attn/q_einsum"], D),
    "attn/kv_einsum": rows(inputs["attn/kv_einsum"], D),
    "attn/attn_vec_einsum": rows(
      inputs["attn/attn_vec_einsum"], N * H
    ),  # (N, H) as the kernel's NHD
    "mlp/gate": rows(inputs["mlp/gate"], D),
    "mlp/up": rows(inputs["mlp/up"], D),
    "mlp/down": rows(inputs["mlp/down"], F),
  }
  dy_rows = {
    "attn/q_einsum": rows(dys["attn/q_einsum"], N * H),  # (N, H) as in NDH
    "attn/kv_einsum": rows(
      np.moveaxis(dys["attn/kv_einsum"], 0, 2), 2 * K * H
    ),  # (C, K, H) as in CKDH
    "attn/attn_vec_einsum": rows(dys["attn/attn_vec_einsum"], D),
    "mlp/gate": rows(dys["mlp/gate"], F),
    "mlp/up": rows(dys["mlp/up"], F),
    "mlp/down": rows(dys["mlp/down"], D),
  }
  kernel = lambda path: np.asarray(p[path.split("/")[0]][path.split("/")[1]]["kernel"], np.float64)
  matrices = {  # (in, out), inputs then outputs in kernel order
    "attn/q_einsum": np.transpose(kernel("attn/q_einsum"), (1, 0, 2)).reshape(D, N * H),
    "attn/kv_einsum": np.transpose(kernel("attn/kv_einsum"), (2, 0, 1, 3)).reshape(D, 2 * K * H),
    "attn/attn_vec_einsum": kernel("attn/attn_vec_einsum").reshape(N * H, D),
    "mlp/gate": kernel("mlp/gate"),
    "mlp/up": kernel("mlp/up"),
    "mlp/down": kernel("mlp/down"),
  }
  want = {}
  for name, x in in_rows.items():
    # Linear in the kernel: the same dL/dW as the rows give, Σ_rows x dyᵀ.
    grad = x.T @ dy_rows[name]
    assert grad.shape == matrices[name].shape
    want[tuple(name.split("/"))] = (x.mean(0), dy_rows[name].mean(0), grad)
  return want


def test_gemma_style_nnx_block():
  """q 'BTD,NDH->BTNH' and kv 'BSD,CKDH->CBSKH' (kernels permuted: input D
  not first; kv's outputs C, K, H around the batch axes), output
  'BTNH,NHD->BTD', and a gated nnx.Linear MLP, through nnx.Optimizer."""
  model = GemmaStyle(nnx.Rngs(0))
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, V, size=(3, 6)))
  targets = jnp.asarray(rng.integers(0, V, size=(3, 6)))

  def loss_fn(model, tokens, targets):
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()

  grad_fn = eva_optax.nnx_value_and_grad(loss_fn)
  optimizer = nnx.Optimizer(model, eva_optax.eva(0.05, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens, targets):
    loss, grads, stats = grad_fn(model, tokens, targets)
    optimizer.update(model, grads, stats=stats)
    return loss, grads, stats

  losses = []
  for _ in range(STEPS + 1):
    last = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    loss, grads, stats = train_step(model, optimizer, tokens, targets)
    losses.append(float(loss))
  assert_trained(losses)

  want_loss, inputs, dys = _gemma_reference(last, tokens, targets)
  np.testing.assert_allclose(losses[-1], want_loss, rtol=1e-5)
  want = _gemma_statistics(last, inputs, dys)
  pure_grads = nnx.to_pure_dict(grads)
  for path, (_, _, grad) in want.items():
    # The reference's rows are the layer's: Σ x dyᵀ is the kernel's gradient.
    kernel_grad = np.asarray(pure_grads[path[0]][path[1]]["kernel"], np.float64)
    order = {"q_einsum": (1, 0, 2), "kv_einsum": (2, 0, 1, 3)}.get(path[1])
    kernel_grad = (np.transpose(kernel_grad, order) if order else kernel_grad).reshape(grad.shape)
    np.testing.assert_allclose(kernel_grad, grad, rtol=1e-4, atol=1e-6)
  assert_statistics(stats, {p: w[:2] for p, w in want.items()})
  layers = {
    tuple(str(k) for k in path)
    for path, module in nnx.iter_modules(model)
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum))
  }
  assert layers == set(want)
  assert_described(nnx.state(model, nnx.Param), stats, layers)
