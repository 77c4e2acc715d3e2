"""The Linen capture (``eva_optax.value_and_grad``) against an independent reference.

The reference never touches the library's code path. It runs a plain forward
pass of a model without lifted transforms, records with ``nn.intercept_methods``
the raw input of every Dense / DenseGeneral / Conv call, adds a zero
perturbation ``eps`` to each call's output and takes ``jax.grad`` w.r.t. the
perturbations: that gives the full per-sample output gradients dL/dy. The means
are then taken in float64 numpy; for Conv the im2col patches of the mean image
are extracted with explicit loops over output positions and window offsets, on
the (input-dilated, padded) mean image, following the padding rules of
``flax.linen.Conv`` written out by hand. The K-FAC factors come from the same
records: A from the rows of every call (for Conv, the patches of the actual
images, by the same loops), G from the rows of dL/dy.

Conventions checked (DESIGN.md §1):

* Dense: ā = mean of the input over every axis but the last; ḡ = mean of dL/dy
  over the same axes, L the loss as written (a mean).
* DenseGeneral: the same over the non-contracted axes, the input flattened in
  the order of the kernel's input axes (Flax sorts ``axis``, so ascending axis
  order even for ``axis=(-1, -2)``), ḡ flattened over the feature axes.
* Conv: the batch mean first, then the mean of its patches over the output
  positions, ordered like the kernel flattened from (*window, in) (HWIO);
  ḡ = mean of dL/dy over batch and positions.
* A = mean over rows of â âᵀ, â = [row, 1] with a bias; rows: every position
  of every sample (Conv: every patch of every image). G = N · Σ_rows dy dyᵀ,
  N the number of samples (leading axis, or the Conv batch axes).
* A module called several times: the mean of the per-call statistics.
* Stacked layers (``nn.scan``): per-layer statistics, stack axis first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from eva_optax import LayerStats, PassThrough
from eva_optax._src.statistics import STATISTICS as ALL_STATISTICS

RTOL = 1e-5
ATOL = 1e-6


# Tiny programs compiled once and run once: fewer XLA passes (conftest.py).
pytestmark = pytest.mark.usefixtures("quick_compiles")


# ---------------------------------------------------------------------------
# Independent reference.


def _tuple(v: Any, n: int | None = None) -> tuple:
  if isinstance(v, int):
    return (v,) * (n or 1)
  return tuple(v)


@dataclasses.dataclass(frozen=True)
class _Call:
  """What the reference recorded about one layer call (static parts)."""

  path: tuple[str, ...]
  kind: str
  config: dict
  has_bias: bool


def _config(module: nn.Module) -> tuple[str, dict] | None:
  if isinstance(module, nn.Dense):
    return "Dense", {}
  if isinstance(module, nn.DenseGeneral):
    return "DenseGeneral", {"axis": module.axis, "features": module.features}
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      return None  # not preconditioned; checked separately
    return "Conv", {
      "kernel_size": _tuple(module.kernel_size),
      "strides": module.strides,
      "padding": module.padding,
      "input_dilation": module.input_dilation,
      "kernel_dilation": module.kernel_dilation,
    }
  return None


def _record(loss_fn, params, args, has_aux, ref_loss_fn, ref_params):
  """Plain value and grads, and per call of the reference model: (static info,
  x, y, kernel, bias, dL/dy) from a plain forward with perturbed outputs.

  One jitted function; the static call info is collected while it is traced.
  """
  shapes: list[tuple[int, ...]] = []

  def shape_interceptor(next_fun, a, kw, ctx):
    y = next_fun(*a, **kw)
    if ctx.method_name == "__call__" and _config(ctx.module) is not None:
      shapes.append(tuple(y.shape))
    return y

  with nn.intercept_methods(shape_interceptor):
    jax.eval_shape(lambda p: ref_loss_fn((ref_params or (lambda q: q))(p), *args), params)

  calls: list[_Call] = []

  def perturbed(eps, params, args):
    calls.clear()
    records = []

    def interceptor(next_fun, a, kw, ctx):
      found = _config(ctx.module) if ctx.method_name == "__call__" else None
      if found is None:
        return next_fun(*a, **kw)
      x = a[0] if a else kw["inputs"]
      y = next_fun(*a, **kw)
      module = ctx.module
      kernel = module.get_variable("params", "kernel")
      bias = module.get_variable("params", "bias")
      has_bias = bias is not None
      if bias is None:
        bias = jnp.zeros(())
      i = len(records)
      records.append((x, y, kernel, bias))
      calls.append(_Call(tuple(module.scope.path), found[0], found[1], has_bias))
      return y + eps[i]

    with nn.intercept_methods(interceptor):
      out = ref_loss_fn(params, *args)
    loss, aux = out if has_aux else (out, None)
    return loss, (records, aux)

  same_model = ref_loss_fn is loss_fn and ref_params is None

  @jax.jit
  def run(params, args):
    eps = [jnp.zeros(s, jnp.float32) for s in shapes]
    if same_model:
      # The plain gradient from the same pass: the perturbations are zero.
      (value, (records, aux)), (dys, grads) = jax.value_and_grad(
        perturbed, argnums=(0, 1), has_aux=True
      )(eps, params, args)
      return (value if aux is None else (value, aux)), grads, dys, records
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
    dys, (records, _) = jax.grad(perturbed, has_aux=True)(eps, ref_params(params), args)
    return value, grads, dys, records

  value, grads, dys, records = run(params, args)
  assert len(calls) == len(shapes)
  as64 = lambda a: np.asarray(a, np.float64)
  return value, grads, [(c, *map(as64, r), as64(dy)) for c, r, dy in zip(calls, records, dys)]


class Expected(NamedTuple):
  """Reference statistics of one layer (float64), named like LayerStats."""

  input_mean: np.ndarray
  output_grad_mean: np.ndarray
  input_factor: np.ndarray
  output_grad_factor: np.ndarray


def _dense_general_rows(config: dict, x: np.ndarray) -> np.ndarray:
  # Flax sorts the contracted axes (``_normalize_axes``): the kernel's input
  # axes, hence the flattened rows, follow ascending axis order even for
  # axis=(-1, -2). The linear check in reference() pins this down.
  axis = sorted(a % x.ndim for a in _tuple(config["axis"]))
  rest = [a for a in range(x.ndim) if a not in axis]
  xt = np.transpose(x, rest + axis)  # contracted axes last
  return xt.reshape(-1, math.prod(x.shape[a] for a in axis))


def _same_pads(size: int, window: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def _conv_patches(config: dict, images: np.ndarray):
  """im2col patches of ``images`` (batch, *spatial, in), explicit loops, HWIO
  order: ``(batch, positions, window * in)`` and the output spatial shape."""
  ks = config["kernel_size"]
  n = len(ks)
  strides = _tuple(config["strides"] or 1, n)
  in_dil = _tuple(config["input_dilation"] or 1, n)
  k_dil = _tuple(config["kernel_dilation"] or 1, n)
  eff = [(k - 1) * d + 1 for k, d in zip(ks, k_dil)]
  batch, channels = images.shape[0], images.shape[-1]
  padding = config["padding"]
  no_pad = [(0, 0)]

  # Flax pads CIRCULAR / REFLECT / CAUSAL itself (before input dilation) and
  # then convolves VALID; the other modes are lax padding of the dilated image.
  if padding in ("CIRCULAR", "REFLECT"):
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    images = np.pad(images, no_pad + [((e - 1) // 2, e // 2) for e in eff] + no_pad, mode=mode)
    padding = "VALID"
  elif padding == "CAUSAL":
    images = np.pad(images, no_pad + [(eff[0] - 1, 0)] + no_pad)
    padding = "VALID"

  if any(d > 1 for d in in_dil):
    dilated = np.zeros(
      (batch,) + tuple((s - 1) * d + 1 for s, d in zip(images.shape[1:-1], in_dil)) + (channels,)
    )
    dilated[(slice(None),) + tuple(slice(None, None, d) for d in in_dil)] = images
    images = dilated

  if padding == "VALID":
    pads = [(0, 0)] * n
  elif padding == "SAME":
    pads = [_same_pads(s, e, st) for s, e, st in zip(images.shape[1:-1], eff, strides)]
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [tuple(p) for p in padding]
  images = np.pad(images, no_pad + list(pads) + no_pad)

  out_shape = [(s - e) // st + 1 for s, e, st in zip(images.shape[1:-1], eff, strides)]
  patches = np.zeros((batch, math.prod(out_shape)) + tuple(ks) + (channels,))
  for p, o in enumerate(np.ndindex(*out_shape)):
    for w in np.ndindex(*ks):
      at = tuple(oi * st + wi * d for oi, st, wi, d in zip(o, strides, w, k_dil))
      patches[(slice(None), p) + w] = images[(slice(None),) + at]
  return patches.reshape(batch, math.prod(out_shape), -1), tuple(out_shape)


def _call_stats(call: _Call, x, y, kernel, bias, dy) -> Expected:
  """The four statistics of one call, from its raw input and dL/dy."""
  if call.kind == "Conv":
    n = len(call.config["kernel_size"])
    images = x.reshape((-1,) + x.shape[x.ndim - n - 1 :])
    samples = images.shape[0]  # product of the batch axes
    patches, out_shape = _conv_patches(call.config, images)
    # The hand-written geometry must give the layer's own output size.
    assert tuple(dy.shape[dy.ndim - n - 1 : -1]) == out_shape
    rows = patches.reshape(-1, patches.shape[-1])
    # ā: the batch mean first, then the mean patch of that image.
    a = _conv_patches(call.config, images.mean(0, keepdims=True))[0][0].mean(0)
  else:
    samples = x.shape[0] if x.ndim > 1 else 1
    if call.kind == "Dense":
      rows = x.reshape(-1, x.shape[-1])
    else:
      rows = _dense_general_rows(call.config, x)
    a = rows.mean(0)
  in_dim = rows.shape[1]
  out_dim = kernel.size // in_dim
  dy_rows = dy.reshape(-1, out_dim)
  # The layer is linear: every output row (less the bias) is its input row
  # times the kernel flattened to (in, out). This checks the reference's rows
  # (feature order, and for Conv the padding geometry) against Flax's own
  # computation; the mean output checks ā (the Conv batch-mean convention).
  w = kernel.reshape(in_dim, out_dim)
  out_rows = (y - bias).reshape(-1, out_dim)
  np.testing.assert_allclose(rows @ w, out_rows, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a @ w, out_rows.mean(0), rtol=1e-4, atol=1e-5)
  assert dy_rows.shape[0] == rows.shape[0]

  hat = np.concatenate([rows, np.ones((len(rows), 1))], 1) if call.has_bias else rows
  return Expected(
    input_mean=a,
    output_grad_mean=dy_rows.mean(0),
    input_factor=hat.T @ hat / len(hat),
    output_grad_factor=samples * dy_rows.T @ dy_rows,
  )


def reference(loss_fn, params, args, has_aux=False, ref_loss_fn=None, ref_params=None):
  """``(value, grads, {path: Expected})`` without the library.

  ``value, grads``: plain ``jax.value_and_grad`` of ``loss_fn`` (when the
  reference model is the model itself, taken in the same pass as dL/dy, whose
  perturbations are zero). The statistics come from
  ``ref_loss_fn(ref_params(params), *args)`` (default: the same loss and
  params), a model without lifted transforms; per call, then averaged over the
  calls of a module. Each call's rows are checked against the kernel's own
  order: the layer is linear, so row @ W must be the output less the bias.
  """
  ref_loss_fn = ref_loss_fn or loss_fn
  value, grads, calls = _record(loss_fn, params, args, has_aux, ref_loss_fn, ref_params)
  per_path: dict[tuple[str, ...], list[Expected]] = {}
  for call, *record in calls:
    per_path.setdefault(call.path, []).append(_call_stats(call, *record))
  return value, grads, {p: Expected(*(np.mean(v, 0) for v in zip(*s))) for p, s in per_path.items()}


# ---------------------------------------------------------------------------
# Helpers.


def _entries(stats: Any) -> dict[tuple[str, ...], Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
    stats, is_leaf=lambda s: isinstance(s, (LayerStats, PassThrough))
  )[0]
  return {tuple(k.key for k in keys): v for keys, v in leaves}


def _layer_stats(stats):
  return {p: e for p, e in _entries(stats).items() if isinstance(e, LayerStats)}


def _data(seed: int, x_shape, out_shape):
  rng = np.random.default_rng(seed)
  # Non-zero, feature-dependent mean so that a wrong ordering or axis shows.
  offset = rng.uniform(-1.0, 1.0, size=x_shape[-1:])
  x = jnp.asarray((rng.normal(size=x_shape) + offset).astype(np.float32))
  t = jnp.asarray(rng.normal(size=out_shape).astype(np.float32))
  return x, t


def _mse_loss(model):
  def loss_fn(params, x, t):
    return jnp.mean((model.apply({"params": params}, x) - t) ** 2)

  return loss_fn


def _assert_tree_close(a, b, rtol=RTOL, atol=ATOL):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _check_against(stats, expected, kinds=None, statistics=eva_optax.EVA_STATISTICS):
  """The captured ``statistics`` equal the reference; the others are None."""
  got = _layer_stats(stats)
  assert set(got) == set(expected)
  for path, want in expected.items():
    entry = got[path]
    if kinds is not None:
      assert entry.kind == kinds[path], path
    for name in Expected._fields:
      value = getattr(entry, name)
      if name not in statistics:
        assert value is None, (path, name)
        continue
      assert value.shape == getattr(want, name).shape, (path, name)
      assert value.dtype == jnp.float32, (path, name)
      np.testing.assert_allclose(
        value, getattr(want, name), rtol=RTOL, atol=ATOL, err_msg=f"{path} {name}"
      )


# ---------------------------------------------------------------------------
# Models.


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(5, name="dense")(x))


class DenseNet(nn.Module):
  """Dense layers on (batch, features) or (batch, seq, features) inputs; one
  of them inside a submodule (a two-level stats path)."""

  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(6, use_bias=self.use_bias, name="hidden")(x))
    h = Nested(name="block")(h)
    return nn.Dense(3, name="out")(h)


class DenseGeneralNet(nn.Module):
  axis: Any
  features: Any

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral(self.features, axis=self.axis, name="proj")(x)
    h = jnp.tanh(h)
    n_features = len(_tuple(self.features))
    axes = tuple(range(-n_features, 0))
    return nn.DenseGeneral(3, axis=axes, name="merge")(h)


class ConvNet(nn.Module):
  conv: dict

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(name="conv", **self.conv)(x))
    return nn.Dense(2, name="head")(h)


class RepeatedNet(nn.Module):
  """One Dense and one Conv, each called twice with the same parameters."""

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(4, (3, 3), padding="SAME", name="conv")
    y1 = jnp.tanh(conv(x))
    y2 = jnp.tanh(conv(x[:, ::2, 1::2] * 2.0 - 0.3))  # other size, other values
    f = jnp.concatenate([y1.mean(axis=(1, 2)), y2.reshape(y2.shape[0], -1)[:, :4]], axis=-1)
    dense = nn.Dense(8, name="shared")
    h = jnp.tanh(dense(f))
    h = jnp.tanh(dense(inputs=h[:, ::-1] + 0.5))  # second call by keyword
    return nn.Dense(3, name="out")(h)


class RematNet(nn.Module):
  remat: bool = True

  @nn.compact
  def __call__(self, x):
    wrap = nn.remat if self.remat else (lambda c: c)
    h = jnp.tanh(wrap(nn.Conv)(4, (3, 3), strides=2, padding="SAME", name="conv")(x))
    h = h.reshape(h.shape[0], -1)
    h = jnp.tanh(wrap(nn.Dense)(6, name="dense")(h))
    h = wrap(Nested)(name="block")(h)
    return nn.Dense(3, name="out")(h)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = jnp.tanh(nn.Dense(5, name="up")(x))
    return jnp.tanh(nn.Dense(4, name="down")(h)) + x, None


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


class UnrolledNet(nn.Module):
  """ScanNet written out by hand: the reference for the stacked layers."""

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x, _ = Block(name=f"block_{i}")(x, None)
    return nn.Dense(2, name="head")(x)


def _unroll_params(params):
  out = {"head": params["head"]}
  for i in range(3):
    out[f"block_{i}"] = jax.tree_util.tree_map(lambda a: a[i], params["blocks"])
  return out


def _stack_expected(ref):
  out = {("head",): ref[("head",)]}
  for layer in ("up", "down"):
    per = [ref[(f"block_{i}", layer)] for i in range(3)]
    out[("blocks", layer)] = Expected(*(np.stack(v) for v in zip(*per)))
  return out


# ---------------------------------------------------------------------------
# Cases: (model, reference model, param map, expected assembly, x shape).


@dataclasses.dataclass(frozen=True)
class Case:
  model: nn.Module
  x_shape: tuple[int, ...]
  ref_model: nn.Module | None = None
  to_ref_params: Callable | None = None
  assemble: Callable = lambda r: r


def _conv_case(x_shape, features=3, **conv):
  return Case(ConvNet(conv=dict(features=features, **conv)), x_shape)


CASES = {
  "dense": Case(DenseNet(), (7, 4)),
  "dense_sequence_no_bias": Case(DenseNet(use_bias=False), (3, 5, 4)),
  "dense_general_2in_2out": Case(DenseGeneralNet(axis=(-2, -1), features=(2, 3)), (4, 5, 3, 2)),
  "dense_general_reversed_axis": Case(DenseGeneralNet(axis=(-1, -2), features=(3, 2)), (4, 3, 5)),
  "dense_general_split_axis": Case(DenseGeneralNet(axis=(1, -1), features=4), (3, 4, 5, 2)),
  "conv1d_same": _conv_case((4, 9, 3), kernel_size=(3,), padding="SAME"),
  "conv1d_causal_dilated": _conv_case(
    (3, 10, 2), kernel_size=(3,), padding="CAUSAL", kernel_dilation=2
  ),
  "conv1d_int_padding_stride": _conv_case((3, 11, 2), kernel_size=(4,), strides=3, padding=1),
  "conv2d_same_no_bias": _conv_case(
    (3, 6, 5, 2), kernel_size=(3, 3), padding="SAME", use_bias=False
  ),
  "conv2d_same_stride": _conv_case(
    (3, 7, 6, 2), kernel_size=(3, 2), strides=(2, 3), padding="SAME"
  ),
  "conv2d_valid_stride_two_batch_dims": _conv_case(
    (2, 3, 7, 6, 3), kernel_size=(3, 2), strides=(2, 1), padding="VALID"
  ),
  "conv2d_explicit_stride": _conv_case(
    (2, 6, 5, 2), kernel_size=(3, 3), strides=2, padding=((1, 2), (0, 1))
  ),
  "conv2d_circular": _conv_case((3, 5, 6, 2), kernel_size=(3, 4), padding="CIRCULAR"),
  "conv2d_reflect": _conv_case((2, 5, 6, 2), kernel_size=(3, 3), padding="REFLECT"),
  "conv2d_kernel_dilation": _conv_case(
    (2, 8, 7, 2), kernel_size=(3, 2), kernel_dilation=(2, 3), padding="SAME"
  ),
  "conv2d_input_kernel_dilation_stride": _conv_case(
    (2, 5, 4, 2),
    kernel_size=(2, 3),
    strides=(2, 1),
    input_dilation=(2, 3),
    kernel_dilation=(1, 2),
    padding=((2, 1), (0, 2)),
  ),
  "conv3d_same_stride": _conv_case(
    (2, 4, 5, 4, 2), kernel_size=(2, 3, 2), strides=(1, 2, 1), padding="SAME"
  ),
  "conv3d_explicit_dilated": _conv_case(
    (2, 4, 4, 5, 2),
    kernel_size=(2, 2, 3),
    kernel_dilation=(2, 1, 1),
    padding=((0, 1), (1, 0), (1, 1)),
  ),
  "repeated_calls": Case(RepeatedNet(), (3, 6, 6, 2)),
  "remat": Case(
    RematNet(remat=True),
    (3, 6, 5, 2),
    ref_model=RematNet(remat=False),
    to_ref_params=lambda p: p,
  ),
  "scan": Case(
    ScanNet(),
    (5, 4),
    ref_model=UnrolledNet(),
    to_ref_params=_unroll_params,
    assemble=_stack_expected,
  ),
}


def _init_params(model, x_shape, seed):
  """Random parameters of the model's shapes (numpy; no compiled init)."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  rng = np.random.default_rng(seed)

  def fill(s):
    scale = 1.0 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.3
    return jnp.asarray((rng.normal(size=s.shape) * scale).astype(np.float32))

  return jax.tree_util.tree_map(fill, shapes)


def _setup(case: Case, seed: int = 0):
  params = _init_params(case.model, case.x_shape, seed)
  x = jax.ShapeDtypeStruct(case.x_shape, jnp.float32)
  out_shape = jax.eval_shape(lambda p, x: case.model.apply({"params": p}, x), params, x).shape
  x, t = _data(seed, case.x_shape, out_shape)
  return params, x, t


def _expected(case: Case, params, x, t):
  """Plain loss and grads of the case's model, and its reference statistics."""
  loss_fn = _mse_loss(case.model)
  ref_loss_fn = loss_fn if case.ref_model is None else _mse_loss(case.ref_model)
  loss, grads, ref = reference(
    loss_fn, params, (x, t), ref_loss_fn=ref_loss_fn, ref_params=case.to_ref_params
  )
  return loss, grads, case.assemble(ref)


@functools.cache
def _case_reference(name: str):
  """``(params, x, t, loss, grads, expected)`` of a case, computed once per
  session (each reference is one compiled program)."""
  case = CASES[name]
  params, x, t = _setup(case)
  return (params, x, t) + _expected(case, params, x, t)


@functools.cache
def _case_capture(name: str, statistics: tuple[str, ...] = eva_optax.EVA_STATISTICS):
  """``(loss, grads, stats)`` of the jitted capture of a case, once per session."""
  params, x, t = _case_reference(name)[:3]
  grad_fn = eva_optax.value_and_grad(_mse_loss(CASES[name].model), statistics=statistics)
  return jax.jit(grad_fn)(params, x, t)


def _check_keyed_like_params(stats, params):
  for path in _layer_stats(stats):
    node = params
    for k in path:
      node = node[k]
    assert "kernel" in node, path


@pytest.mark.parametrize("name", list(CASES))
def test_stats_and_grads_match_reference(name):
  params, x, t, want_loss, want_grads, expected = _case_reference(name)
  loss, grads, stats = _case_capture(name)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(grads, want_grads)
  _check_against(stats, expected)
  _check_keyed_like_params(stats, params)


def test_without_jit():
  """The same statistics when nothing is jitted (a Conv + Dense model)."""
  name = "conv2d_same_no_bias"
  params, x, t, want_loss, want_grads, expected = _case_reference(name)
  loss, grads, stats = eva_optax.value_and_grad(_mse_loss(CASES[name].model))(params, x, t)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(grads, want_grads)
  _check_against(stats, expected)


# ---------------------------------------------------------------------------
# K-FAC factors and the choice of statistics.


FACTOR_CASES = [
  "dense",  # (batch, features), with and without a submodule
  "dense_sequence_no_bias",  # (batch, seq, features): rows over seq, N = batch
  "dense_general_2in_2out",  # axis=(-2, -1), features=(2, 3)
  "conv1d_causal_dilated",
  "conv2d_same_stride",  # with a bias
  "conv2d_same_no_bias",
  "conv2d_valid_stride_two_batch_dims",  # N = product of the batch axes
  "conv2d_input_kernel_dilation_stride",
  "repeated_calls",  # Dense and Conv called twice (one call by keyword)
  "scan",  # per layer, stack axis first
]


@pytest.mark.parametrize("name", FACTOR_CASES)
def test_factors_match_reference(name):
  """All four statistics at once: each equals the reference, and the loss and
  grads are the plain ones."""
  _, _, _, want_loss, want_grads, expected = _case_reference(name)
  loss, grads, stats = _case_capture(name, ALL_STATISTICS)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(grads, want_grads)
  _check_against(stats, expected, statistics=ALL_STATISTICS)


@pytest.mark.parametrize(
  "name, statistics",
  [
    ("repeated_calls", ("input_mean",)),  # Eva-f: no backward probes
    ("scan", ("input_mean",)),
    ("conv2d_same_stride", ("input_factor",)),  # FOOF
    ("scan", ("output_grad_factor",)),
    ("repeated_calls", ("output_grad_mean", "input_factor")),
  ],
)
def test_statistics_choice(name, statistics):
  """Only the statistics asked for are captured, each equal to the reference
  (and the one of the default capture); the loss and grads do not change."""
  _, _, _, want_loss, want_grads, expected = _case_reference(name)
  loss, grads, stats = _case_capture(name, statistics)
  default_loss, default_grads, default_stats = _case_capture(name)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(grads, want_grads)
  np.testing.assert_allclose(loss, default_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(grads, default_grads)
  _check_against(stats, expected, statistics=statistics)
  default = _layer_stats(default_stats)
  for path, entry in _layer_stats(stats).items():
    for field in set(statistics) & set(eva_optax.EVA_STATISTICS):
      np.testing.assert_allclose(
        getattr(entry, field), getattr(default[path], field), rtol=RTOL, atol=ATOL
      )


@pytest.mark.parametrize(
  "statistics",
  [("hessian",), ("input_mean", "input_covariance"), ("input_factor", "output_grad_factors"), ()],
)
def test_unknown_statistics_raise(statistics):
  loss_fn = _mse_loss(CASES["dense"].model)
  with pytest.raises(ValueError, match="statistics"):
    eva_optax.value_and_grad(loss_fn, statistics=statistics)


def _abstract_stats(name):
  case = CASES[name]
  params, x, t = _setup(case)
  _, _, stats = jax.eval_shape(eva_optax.value_and_grad(_mse_loss(case.model)), params, x, t)
  return _layer_stats(stats)


def test_kinds_and_layouts():
  proj = _abstract_stats("dense_general_2in_2out")[("proj",)]
  assert proj.kind == "DenseGeneral" and proj.has_bias
  assert proj.layout == eva_optax.KernelLayout(0, 2)
  assert proj.input_mean.shape == (3 * 2,)
  assert proj.output_grad_mean.shape == (2 * 3,)

  entries = _abstract_stats("scan")
  for layer, (n_in, n_out) in (("up", (4, 5)), ("down", (5, 4))):
    e = entries[("blocks", layer)]
    assert e.kind == "Dense" and e.layout == eva_optax.KernelLayout(1, 1)
    assert e.input_mean.shape == (3, n_in) and e.output_grad_mean.shape == (3, n_out)
  assert entries[("head",)].layout == eva_optax.KernelLayout(0, 1)

  conv = _abstract_stats("conv2d_same_no_bias")[("conv",)]
  assert conv.kind == "Conv" and not conv.has_bias
  assert conv.layout == eva_optax.KernelLayout(0, 1)
  assert conv.input_mean.shape == (3 * 3 * 2,)
  assert conv.input_mean.dtype == jnp.float32

  conv3 = _abstract_stats("conv3d_explicit_dilated")[("conv",)]
  assert conv3.input_mean.shape == (2 * 2 * 3 * 2,)


# ---------------------------------------------------------------------------
# has_aux with BatchNorm.


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.relu(nn.Dense(6, name="dense")(x))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.8, name="bn")(h)
    return nn.Dense(3, name="out")(jnp.tanh(h))


def test_has_aux_with_batch_norm():
  model = BNNet()
  x, t = _data(3, (8, 4), (8, 3))
  params = _init_params(model, x.shape, 1)
  rng = np.random.default_rng(4)
  batch_stats = {
    "bn": {
      "mean": jnp.asarray(rng.normal(size=6).astype(np.float32)),
      "var": jnp.asarray(rng.uniform(0.5, 2.0, size=6).astype(np.float32)),
    }
  }

  def loss_fn(params, batch_stats, x, t):
    y, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
    )
    return jnp.mean((y - t) ** 2), (updates["batch_stats"], y)

  (want_loss, want_aux), want_grads, expected = reference(
    loss_fn, params, (batch_stats, x, t), has_aux=True
  )
  assert set(expected) == {("dense",), ("out",)}
  # And literally jax.value_and_grad of the same loss.
  (plain_loss, plain_aux), plain_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    params, batch_stats, x, t
  )
  np.testing.assert_allclose(plain_loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close((plain_aux, plain_grads), (want_aux, want_grads))

  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn, has_aux=True))
  (loss, aux), grads, stats = grad_fn(params, batch_stats, x, t)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(aux, want_aux)
  _assert_tree_close(grads, want_grads)
  # The batch statistics were really updated (and passed through aux).
  assert not np.allclose(aux[0]["bn"]["mean"], batch_stats["bn"]["mean"])
  _check_against(stats, expected, kinds={("dense",): "Dense", ("out",): "Dense"})
  assert ("bn",) not in _entries(stats)  # no kernel: not a layer of the stats


def test_has_aux_requires_pair():
  case = CASES["dense"]
  params, x, t = _setup(case)
  grad_fn = eva_optax.value_and_grad(_mse_loss(case.model), has_aux=True)
  with pytest.raises(TypeError, match="has_aux"):
    jax.eval_shape(grad_fn, params, x, t)


# ---------------------------------------------------------------------------
# Layers passed through.


class PassThroughNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3, 3), padding="SAME", feature_group_count=2, name="grouped")(x)
    h = jnp.tanh(nn.ConvTranspose(4, (2, 2), strides=(2, 2), name="up")(jnp.tanh(h)))
    h = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding="SAME", name="conv")(h))
    h = nn.Einsum((3, 5), "...c,cd->...d", name="einsum")(h)  # an ellipsis: not named
    return nn.Dense(2, name="head")(jnp.tanh(h))


def test_pass_through_layers():
  model = PassThroughNet()
  x_shape = (2, 4, 6, 2)
  params = _init_params(model, x_shape, 2)
  x, t = _data(5, x_shape, (2, 4, 6, 2))
  loss_fn = _mse_loss(model)
  want_loss, want_grads, expected = reference(loss_fn, params, (x, t))
  assert set(expected) == {("conv",), ("head",)}

  loss, grads, stats = jax.jit(eva_optax.value_and_grad(loss_fn))(params, x, t)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
  _assert_tree_close(grads, want_grads)
  # The grouped Conv is captured (a stack of its groups; checked against the
  # ungrouped Convs of its groups in test_grouped_conv_is_a_stack_…).
  _check_against({k: v for k, v in stats.items() if k != "grouped"}, expected)

  entries = _entries(stats)
  assert set(entries) == {("grouped",), ("up",), ("conv",), ("einsum",), ("head",)}
  grouped = entries[("grouped",)]
  assert isinstance(grouped, LayerStats) and grouped.kind == "Conv"
  assert grouped.layout.groups == 2
  for path, kind, reason in (
    (("up",), "ConvTranspose", "not a Dense, DenseGeneral, Conv or Einsum"),
    (("einsum",), "Einsum", "has an ellipsis"),
  ):
    entry = entries[path]
    assert isinstance(entry, PassThrough), path
    assert entry.kind == kind
    assert reason in entry.reason
  # describe() shows the module type next to the reason.
  text = str(eva_optax.describe(params, stats))
  assert "ConvTranspose" in text and "Einsum" in text


# ---------------------------------------------------------------------------
# The factors' gate (factors_due).


@pytest.mark.parametrize("name", ["repeated_calls", "scan", "conv2d_same_stride"])
def test_factors_gate(name):
  """Open: every statistic equals the reference. Closed: the factors are zero,
  the vectors, loss and grads unchanged. One compilation for both."""
  params, x, t, want_loss, want_grads, expected = _case_reference(name)
  grad_fn = eva_optax.value_and_grad(_mse_loss(CASES[name].model), statistics=ALL_STATISTICS)
  traces = []

  @jax.jit
  def run(due):
    traces.append(1)
    return grad_fn(params, x, t, factors_due=due)

  for due in (True, False):
    loss, grads, stats = run(jnp.asarray(due))
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    _assert_tree_close(grads, want_grads)
    if due:
      _check_against(stats, expected, statistics=ALL_STATISTICS)
    else:
      for entry in _layer_stats(stats).values():
        assert not np.any(entry.input_factor) and not np.any(entry.output_grad_factor)
      vectors = jax.tree.map(
        lambda e: dataclasses.replace(e, input_factor=None, output_grad_factor=None),
        stats,
        is_leaf=lambda e: isinstance(e, eva_optax.LayerStats),
      )
      _check_against(vectors, expected, statistics=eva_optax.EVA_STATISTICS)
  assert len(traces) == 1


def test_factors_gate_skips_the_work():
  """A closed gate removes the factor products from the executed work: the
  cost of the step with the gate as a constant False is that of the plain
  capture of the vectors."""
  model = nn.Dense(256)
  params = model.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
  x, t = jnp.ones((512, 256)), jnp.ones((512, 256))
  loss = _mse_loss(model)

  def flops(statistics, **kw):
    fn = jax.jit(lambda p: eva_optax.value_and_grad(loss, statistics=statistics)(p, x, t, **kw))
    return fn.lower(params).compile().cost_analysis()["flops"]

  vectors = flops(eva_optax.EVA_STATISTICS)
  factors = flops(ALL_STATISTICS)
  gated = flops(ALL_STATISTICS, factors_due=False)
  assert factors > vectors + 2 * 512 * 256 * 256  # at least A and G
  assert gated < vectors + 0.01 * (factors - vectors)


@pytest.mark.parametrize(
  "statistics, due, match",
  [
    (eva_optax.EVA_STATISTICS, False, "none was asked for"),
    (ALL_STATISTICS, jnp.ones(3, bool), "scalar bool"),
    (ALL_STATISTICS, 0.5, "scalar bool"),
  ],
)
def test_factors_gate_bad_values(statistics, due, match):
  name = "dense"
  params, x, t = _case_reference(name)[:3]
  grad_fn = eva_optax.value_and_grad(_mse_loss(CASES[name].model), statistics=statistics)
  with pytest.raises(ValueError, match=match):
    grad_fn(params, x, t, factors_due=due)


# ---------------------------------------------------------------------------
# nn.Einsum: the contracted, output and stack axes read from the equation.


class _EinsumNet(nn.Module):
  """q: 'BTD,NDH->BTNH' (bias over N, H; kernel axes permuted to D | N H);
  per_head: 'BTNH,NHE->BTNE' (N a stack axis: one layer per head);
  out: 'BTNE,NED->BTD' (two contracted axes, no bias)."""

  @nn.compact
  def __call__(self, x):
    q = nn.Einsum((3, 4, 5), "BTD,NDH->BTNH", name="q")(x)
    h = nn.Einsum((3, 5, 2), "BTNH,NHE->BTNE", name="per_head")(jnp.tanh(q))
    return nn.Einsum((3, 2, 4), "BTNE,NED->BTD", use_bias=False, name="out")(jnp.tanh(h))


def _einsum_problem():
  x = jax.random.normal(jax.random.key(0), (2, 6, 4))
  y = jax.random.normal(jax.random.key(1), (2, 6, 4))
  model = _EinsumNet()
  params = model.init(jax.random.key(2), x)["params"]
  return model, params, x, y


def test_einsum_statistics_match_independent_ones():
  """ā: the layer input averaged over every axis but the contracted (and stack)
  ones; ḡ: ∂L/∂y averaged likewise over the non-output axes, from jax.vjp of
  each layer output; A and G per stack index by their definitions."""
  model, params, x, y = _einsum_problem()
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  _, _, stats = eva_optax.value_and_grad(loss, statistics=ALL_STATISTICS)(params)

  k = {name: params[name]["kernel"] for name in params}
  q = jnp.einsum("BTD,NDH->BTNH", x, k["q"]) + params["q"]["bias"]
  h = jnp.einsum("BTNH,NHE->BTNE", jnp.tanh(q), k["per_head"]) + params["per_head"]["bias"]

  def tail(q, h, z_out):
    h = jnp.einsum("BTNH,NHE->BTNE", jnp.tanh(q), k["per_head"]) + params["per_head"]["bias"] + h
    return jnp.mean((jnp.einsum("BTNE,NED->BTD", jnp.tanh(h), k["out"]) + z_out - y) ** 2)

  g_q, g_h, g_out = jax.grad(tail, argnums=(0, 1, 2))(q, jnp.zeros_like(h), jnp.zeros((2, 6, 4)))
  n = 12  # B·T rows
  x_rows = np.asarray(x).reshape(n, 4)
  hq = np.tanh(np.asarray(q))  # (B, T, N, H): per-head input of per_head
  hh = np.tanh(np.asarray(h)).reshape(n, 6)  # (N·E) in kernel order N, E
  want = {
    "q": (x_rows.mean(0), np.asarray(g_q).reshape(n, 15).mean(0)),
    "per_head": (hq.reshape(n, 3, 5).mean(0), np.asarray(g_h).reshape(n, 3, 2).mean(0)),
    "out": (hh.mean(0), np.asarray(g_out).reshape(n, 4).mean(0)),
  }
  for name, (a, g) in want.items():
    entry = stats[name]
    assert isinstance(entry, LayerStats) and entry.kind == "Einsum"
    np.testing.assert_allclose(entry.input_mean, a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(entry.output_grad_mean, g, rtol=RTOL, atol=1e-9)
  assert stats["q"].layout == eva_optax.KernelLayout(0, 2, (1, 0, 2), (0, 2))
  assert stats["per_head"].layout.stack_ndim == 1 and stats["per_head"].input_mean.shape == (3, 5)
  # K-FAC factors of the stacked layer: per head, A = mean [a,1][a,1]ᵀ, G = N·Σ g gᵀ.
  rows = np.concatenate([hq.reshape(n, 3, 5), np.ones((n, 3, 1))], axis=-1).transpose(1, 0, 2)
  np.testing.assert_allclose(
    stats["per_head"].input_factor, np.einsum("nri,nrj->nij", rows, rows) / n, rtol=RTOL, atol=ATOL
  )
  gh = np.asarray(g_h).reshape(n, 3, 2).transpose(1, 0, 2)
  np.testing.assert_allclose(
    stats["per_head"].output_grad_factor,
    2 * np.einsum("nro,nrp->nop", gh, gh),
    rtol=RTOL,
    atol=1e-9,
  )


def test_eva_on_an_einsum_equals_eva_on_the_same_dense_general():
  """'BTD,NDH->BTNH' with kernel (N, D, H) is DenseGeneral(features=(N, H)) with
  the kernel transposed to (D, N, H): the same statistics and, given the
  captured layouts, the same Eva update, transposed back."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 4))
  y = jax.random.normal(jax.random.key(1), (2, 6, 3, 5))
  einsum = nn.Einsum((3, 4, 5), "BTD,NDH->BTNH")
  dense = nn.DenseGeneral((3, 5))
  pe = einsum.init(jax.random.key(2), x)["params"]
  pd = {"kernel": jnp.transpose(pe["kernel"], (1, 0, 2)), "bias": pe["bias"]}
  updates = {}
  for name, model, params in (("einsum", einsum, pe), ("dense", dense, pd)):
    loss = lambda p: jnp.mean((jnp.tanh(model.apply({"params": p}, x)) - y) ** 2)
    _, grads, stats = eva_optax.value_and_grad(loss)(params)
    tx = eva_optax.eva(0.1, layouts=eva_optax.layouts_of(stats))
    updates[name], _ = tx.update(grads, tx.init(params), params, stats=stats)
  np.testing.assert_allclose(
    jnp.transpose(updates["einsum"]["kernel"], (1, 0, 2)),
    updates["dense"]["kernel"],
    rtol=1e-5,
    atol=1e-8,
  )
  np.testing.assert_allclose(
    updates["einsum"]["bias"], updates["dense"]["bias"], rtol=1e-5, atol=1e-8
  )
  assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0


@pytest.mark.parametrize(
  "equation, shape, word",
  [
    ("...D,DH->...H", (4, 5), "ellipsis"),
    ("BTD,DD->BTD", (4, 4), "repeats a label"),
    ("BTD,DH->BH", (4, 5), "sums an input axis"),
    ("BTD,DHK->BTH", (4, 5, 2), "sums a kernel axis"),
  ],
)
def test_einsum_the_statistics_do_not_describe_is_passed_through(equation, shape, word):
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  layer = nn.Einsum(shape, equation, use_bias=False)
  params = layer.init(jax.random.key(1), x)["params"]
  _, _, stats = eva_optax.value_and_grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(
    params
  )
  assert isinstance(stats, PassThrough) and stats.kind == "Einsum"
  assert word in stats.reason and "plain gradient" in stats.reason


# ---------------------------------------------------------------------------
# Grouped and depthwise convolutions: each group of channels its own layer.


class _Grouped(nn.Module):
  groups: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), padding="SAME", feature_group_count=self.groups, name="conv")(x)


class _SplitIntoGroups(nn.Module):
  """The same map as _Grouped: one ungrouped Conv per group of channels."""

  groups: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1] // self.groups
    return jnp.concatenate(
      [
        nn.Conv(6 // self.groups, (3, 3), padding="SAME", name=f"g{i}")(x[..., i * c : (i + 1) * c])
        for i in range(self.groups)
      ],
      axis=-1,
    )


@pytest.mark.parametrize("groups", [2, 6])  # grouped; depthwise (one channel a group)
def test_grouped_conv_is_a_stack_of_the_ungrouped_convs_of_its_groups(groups):
  """ā, ḡ, A and G of group g equal those of the ungrouped Conv that maps the
  g-th channels to the g-th outputs, and so does Eva's update (the KL clip
  sums over the same layers), given the captured layouts."""
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 6))
  y = jax.random.normal(jax.random.key(1), (3, 5, 5, 6))
  grouped, split = _Grouped(groups), _SplitIntoGroups(groups)
  pg = grouped.init(jax.random.key(2), x)["params"]["conv"]
  per = 6 // groups
  ps = {
    f"g{i}": {
      "kernel": pg["kernel"][..., i * per : (i + 1) * per],
      "bias": pg["bias"][i * per : (i + 1) * per],
    }
    for i in range(groups)
  }
  runs = {}
  for name, model, params in (("grouped", grouped, {"conv": pg}), ("split", split, ps)):
    loss = lambda p: jnp.mean((jnp.tanh(model.apply({"params": p}, x)) - y) ** 2)
    _, grads, stats = eva_optax.value_and_grad(loss, statistics=ALL_STATISTICS)(params)
    tx = eva_optax.eva(0.1, layouts=eva_optax.layouts_of(stats))
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    runs[name] = (stats, updates)
  stats, updates = runs["grouped"]
  assert stats["conv"].layout.groups == groups and stats["conv"].input_mean.shape == (
    groups,
    9 * 6 // groups,
  )
  # The updates in float32 (entries up to ~2e-2): an entry near zero differs by a few
  # float32 roundings of the largest ones (2.9e-9 seen), so the absolute tolerance is
  # 1e-5 of the largest entry, the relative one 1e-5.
  scale = float(jnp.max(jnp.abs(updates["conv"]["kernel"])))
  for i in range(groups):
    want = runs["split"][0][f"g{i}"]
    for field in ALL_STATISTICS:
      np.testing.assert_allclose(
        getattr(stats["conv"], field)[i], getattr(want, field), rtol=RTOL, atol=1e-9
      )
    np.testing.assert_allclose(
      updates["conv"]["kernel"][..., i * per : (i + 1) * per],
      runs["split"][1][f"g{i}"]["kernel"],
      rtol=1e-5,
      atol=1e-5 * scale,
    )
    np.testing.assert_allclose(
      updates["conv"]["bias"][i * per : (i + 1) * per],
      runs["split"][1][f"g{i}"]["bias"],
      rtol=1e-5,
      atol=1e-5 * scale,
    )


def test_boxed_parameters_with_partitioning_metadata_are_captured_like_plain_ones():
  """``model.init`` returns kernels boxed in ``nn.LogicallyPartitioned`` when a
  layer uses ``nn.with_logical_partitioning``; the capture reads through the box,
  and Eva's update of the boxed tree (boxes kept) equals that of the unboxed one."""

  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      x = nn.relu(nn.Dense(4, kernel_init=init)(x))
      return nn.Dense(2)(x)

  model = Boxed()
  x = jax.random.normal(jax.random.key(0), (6, 5))
  y = jax.random.normal(jax.random.key(1), (6, 2))
  boxed = model.init(jax.random.key(2), x)["params"]
  assert isinstance(boxed["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  plain = nn.unbox(boxed)
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  tx = eva_optax.eva(0.1)
  out = {}
  for name, params in (("boxed", boxed), ("plain", plain)):
    _, grads, stats = eva_optax.value_and_grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    out[name] = (stats, updates)
  assert isinstance(out["boxed"][1]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  for a, b in zip(jax.tree.leaves(out["boxed"]), jax.tree.leaves(out["plain"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert isinstance(out["boxed"][0]["Dense_0"], eva_optax.LayerStats)


class _SeqNet(nn.Module):
  @nn.compact
  def __call__(self, x):  # (batch, time, features)
    h = jnp.tanh(nn.Dense(4, name="proj")(x))
    return nn.Dense(2, use_bias=False, name="head")(h.mean(axis=1))


def _seq_problem(batch=6):
  model = _SeqNet()
  x = jax.random.normal(jax.random.key(0), (batch, 5, 3))
  t = jax.random.normal(jax.random.key(1), (batch, 2))
  params = model.init(jax.random.key(2), x)["params"]
  loss = lambda p, x, t: jnp.mean((model.apply({"params": p}, x) - t) ** 2)
  return model, params, loss, x, t


def test_sample_rows_factors_are_per_sample_means_of_inputs_and_mean_loss_gradients():
  """factor_rows='samples': A = mean_n â_n â_nᵀ with â_n = [mean over sample n's
  time steps, 1]; G = mean_n ḡ_n ḡ_nᵀ with ḡ_n = mean over them of ∂L/∂y (L the
  mean loss), against explicit per-sample values; ā, ḡ unchanged; and for the
  head (one row per sample) G is 1/N² of the default's, A the same."""
  model, params, loss, x, t = _seq_problem()
  n = x.shape[0]
  _, _, stats = eva_optax.value_and_grad(loss, statistics=ALL_STATISTICS, factor_rows="samples")(
    params, x, t
  )
  _, _, rows = eva_optax.value_and_grad(loss, statistics=ALL_STATISTICS)(params, x, t)

  def forward(p, e_proj, e_head):
    y = x @ p["proj"]["kernel"] + p["proj"]["bias"] + e_proj
    h = jnp.tanh(y).mean(axis=1)
    return jnp.mean((h @ p["head"]["kernel"] + e_head - t) ** 2), h

  (g_proj, g_head), h = jax.grad(forward, argnums=(1, 2), has_aux=True)(
    params, jnp.zeros((n, 5, 4)), jnp.zeros((n, 2))
  )
  a = np.concatenate([np.asarray(x).mean(axis=1), np.ones((n, 1))], axis=1)
  g = np.asarray(g_proj).mean(axis=1)
  np.testing.assert_allclose(stats["proj"].input_factor, a.T @ a / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats["proj"].output_grad_factor, g.T @ g / n, rtol=1e-5, atol=1e-12)
  h, gh = np.asarray(h), np.asarray(g_head)
  np.testing.assert_allclose(stats["head"].input_factor, h.T @ h / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats["head"].output_grad_factor, gh.T @ gh / n, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(stats["head"].input_factor, rows["head"].input_factor, rtol=1e-6)
  np.testing.assert_allclose(
    stats["head"].output_grad_factor * n**2, rows["head"].output_grad_factor, rtol=1e-5
  )
  for name in ("proj", "head"):
    assert stats[name].factor_rows == "samples" and rows[name].factor_rows == "positions"
    np.testing.assert_array_equal(stats[name].input_mean, rows[name].input_mean)
    np.testing.assert_array_equal(stats[name].output_grad_mean, rows[name].output_grad_mean)
  # proj has 5 positions per sample: its factors differ from the default's.
  assert not np.allclose(stats["proj"].input_factor, rows["proj"].input_factor, rtol=1e-3)
  with pytest.raises(ValueError, match="factor_rows"):
    eva_optax.value_and_grad(loss, factor_rows="sample")


def test_sample_rows_factors_under_pmap_equal_one_device():
  """8 devices of 2 samples each, axis_name='batch': the 'samples' A and G (whose
  G carries 1/batch²) equal those of the 16 samples on one device."""
  model, params, loss, x, t = _seq_problem(batch=16)
  statistics = ("input_factor", "output_grad_factor")
  one = eva_optax.value_and_grad(loss, statistics=statistics, factor_rows="samples")
  many = eva_optax.value_and_grad(
    loss, statistics=statistics, factor_rows="samples", axis_name="batch"
  )
  _, _, want = one(params, x, t)
  shard = lambda a: a.reshape((8, 2) + a.shape[1:])
  _, _, got = jax.pmap(lambda xs, ts: many(params, xs, ts), axis_name="batch")(shard(x), shard(t))
  for name in ("proj", "head"):
    for field in statistics:
      np.testing.assert_allclose(
        getattr(got[name], field)[3], getattr(want[name], field), rtol=1e-5, atol=1e-12
      )
