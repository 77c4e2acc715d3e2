"""One-pass capture of Kronecker vectors from a Flax Linen model.

:func:`value_and_grad` works like :func:`jax.value_and_grad` and also returns,
from the same forward and backward pass, the statistics of every ``nn.Dense``,
``nn.DenseGeneral`` and ``nn.Conv`` call of the model, without changes to the
model (``flax.linen.intercept_methods``):

* ā (``input_mean``): mean of the layer input over every axis but the
  contracted ones (Dense/DenseGeneral); for Conv, the input is averaged over
  the batch first, then the im2col patches of that mean image (the layer's own
  padding, strides and dilations) are averaged over the output positions, in
  the order of the kernel flattened to ``(in, out)`` — the authors' convention.
* ḡ (``output_grad_mean``): mean over batch and positions of ∂L/∂y, with L the
  user's loss (a mean over the batch, so ḡ carries the 1/batch factor).

How: before the real pass, an abstract pass (``jax.eval_shape``) finds the
layers. Each layer then gets two zero "probes" next to its kernel, passed into
the differentiated function with the parameters, so that lifted transforms
(``nn.scan``, ``nn.remat``) slice and carry them like parameters:

* the output probe p (shape ``(out,)``) is added to the output, y + p / n with
  n the number of output positions of the call; ∂L/∂p is then the mean of ∂L/∂y
  — a bias-gradient-like reduction, never a copy of the activations;
* the input probe q (shape ``(in + 1,)``) enters through an identity with a
  custom VJP whose cotangent for q is ``[ā of this call, 1]``.

Both probes are zero and change no value. A module called several times
accumulates one contribution per call in each probe, and the trailing 1 of q
counts the calls, so the statistics are averaged over the calls.

References:
  Zhang, Shi, Li. Eva: Practical Second-order Optimization with
  Kronecker-vectorized Approximation. ICLR 2023.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eva_optax.layers import (
    BIAS,
    KERNEL,
    KernelLayout,
    LayerStats,
    PassThrough,
    Path,
    flatten_with_paths,
    nest,
)

INPUT_PROBE = "eva_input_probe"
OUTPUT_PROBE = "eva_output_probe"
OUTPUT_FACTOR_PROBE = "eva_output_factor_probe"

INPUT_MEAN = "input_mean"
OUTPUT_GRAD_MEAN = "output_grad_mean"
INPUT_FACTOR = "input_factor"
OUTPUT_GRAD_FACTOR = "output_grad_factor"
STATISTICS = (INPUT_MEAN, OUTPUT_GRAD_MEAN, INPUT_FACTOR, OUTPUT_GRAD_FACTOR)
EVA_STATISTICS = (INPUT_MEAN, OUTPUT_GRAD_MEAN)
FACTORS = (INPUT_FACTOR, OUTPUT_GRAD_FACTOR)
# The keyword of ``grad_fn`` that gates the factors, and the probe entry that
# carries the gate to every layer (sliced by nn.scan like the other probes).
FACTORS_DUE = "factors_due"

_SUPPORTED = "Dense, DenseGeneral or Conv"


class _Layer(NamedTuple):
  """What the abstract pass learned about one captured layer (static)."""

  kind: str
  layout: KernelLayout
  stack_shape: tuple[int, ...]
  in_dim: int
  out_dim: int
  has_bias: bool


class _Seen(NamedTuple):
  kind: str
  output_ndim: int
  kernel_shape: tuple[int, ...]
  has_bias: bool
  skip_reason: str | None


_local = threading.local()


def _kind(module: nn.Module) -> str | None:
  if isinstance(module, nn.Dense):
    return "Dense"
  if isinstance(module, nn.DenseGeneral):
    return "DenseGeneral"
  if isinstance(module, nn.Conv):
    return "Conv"
  return None


def _skip_reason(module: nn.Module, kind: str) -> str | None:
  """Why a supported layer kind is still passed through, or ``None``."""
  if kind == "Conv" and module.feature_group_count != 1:
    return (
        f"grouped convolution (feature_group_count={module.feature_group_count})"
        " is not preconditioned: its parameters get the plain gradient"
    )
  if kind == "DenseGeneral" and tuple(
      nn.linear._canonicalize_tuple(module.batch_dims)
  ):
    return (
        "DenseGeneral with batch_dims is not preconditioned: its parameters get"
        " the plain gradient"
    )
  return None


def _output_ndim(module: nn.Module, kind: str) -> int:
  if kind == "DenseGeneral":
    return len(nn.linear._canonicalize_tuple(module.features))
  return 1


def _inputs_of(args: tuple, kwargs: dict) -> tuple[Any, Callable[[Any], tuple]]:
  """The layer input and a function putting a replacement back in place."""
  if args:
    return args[0], lambda x: ((x,) + tuple(args[1:]), kwargs)
  x = kwargs["inputs"]
  return x, lambda x: (args, {**kwargs, "inputs": x})


# ---------------------------------------------------------------------------
# Statistics of one call.


def _kernel_size(module: nn.Module) -> tuple[int, ...]:
  ks = module.kernel_size
  return (ks,) if isinstance(ks, int) else tuple(ks)


def _input_rows(module: nn.Module, kind: str, x: jax.Array) -> jax.Array:
  """The layer input as rows ``(positions, in)`` in the kernel's input order.

  Dense / DenseGeneral: every non-contracted position is a row. Conv: the
  im2col patches of the input, obtained by the layer's own convolution with an
  identity kernel (so every Flax padding mode, stride and dilation applies).
  """
  if kind == "Dense":
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if kind == "DenseGeneral":
    axis = nn.linear._normalize_axes(nn.linear._canonicalize_tuple(module.axis), x.ndim)
    moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    in_dim = math.prod(x.shape[a] for a in axis)
    return moved.reshape(-1, in_dim).astype(jnp.float32)
  kernel_size = _kernel_size(module)
  spatial = x.shape[x.ndim - len(kernel_size) - 1 :]
  in_dim = math.prod(kernel_size) * spatial[-1]
  identity = jnp.eye(in_dim, dtype=jnp.float32).reshape(kernel_size + (spatial[-1], in_dim))
  images = x.reshape((-1,) + spatial).astype(jnp.float32)
  patches = _probe_conv(module, in_dim).apply({"params": {KERNEL: identity}}, images)
  return patches.reshape(-1, in_dim)


def _probe_conv(module: nn.Module, features: int) -> nn.Conv:
  """The layer's convolution (same geometry), float32, no bias, no mask."""
  fields = {
      f.name: getattr(module, f.name)
      for f in dataclasses.fields(nn.Conv)
      if f.init and f.name not in ("parent", "name")
  }
  fields.update(
      features=features,
      use_bias=False,
      mask=None,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      precision=jax.lax.Precision.HIGHEST,
  )
  return nn.Conv(**fields)


def _input_mean(module: nn.Module, kind: str, x: jax.Array) -> jax.Array:
  """ā of one call (without the bias 1).

  Dense / DenseGeneral: the mean of the rows. Conv: batch mean first, then the
  mean of its im2col patches, in HWIO order. With zero padding (SAME, VALID,
  CAUSAL, explicit pads) that patch mean is one matrix product with a constant
  selection matrix (:func:`_patch_selection`). Otherwise (CIRCULAR, REFLECT,
  input dilation) it is the gradient, w.r.t. a one-output kernel, of the mean
  over positions of the layer's own convolution of the mean image:
  convolution is linear in the kernel, so this reuses Flax's own padding.
  """
  if kind != "Conv":
    return jnp.mean(_input_rows(module, kind, x), axis=0)
  kernel_size = _kernel_size(module)
  spatial = x.shape[x.ndim - len(kernel_size) - 1 :]
  images = x.reshape((-1,) + spatial).astype(jnp.float32)
  mean_image = jnp.mean(images, axis=0)
  selection = _patch_selection(module, spatial[:-1])
  if selection is not None:
    # ā = M · vec(mean image): one product, M constant (built at trace time).
    flat = mean_image.reshape(-1, spatial[-1])
    return jnp.dot(selection, flat, precision=jax.lax.Precision.HIGHEST).reshape(-1)
  conv = _probe_conv(module, 1)
  mean_image = mean_image[None]
  # Per device under shard_map (else its gradient would be summed over devices).
  kernel = _varying_like(jnp.zeros(kernel_size + (spatial[-1], 1), jnp.float32), mean_image)
  out, vjp = jax.vjp(lambda k: conv.apply({"params": {KERNEL: k}}, mean_image), kernel)
  (patch_mean,) = vjp(_varying_like(jnp.full(out.shape, 1.0 / out.size, out.dtype), out))
  return patch_mean.reshape(-1)


def _patch_selection(module: nn.Module, spatial: tuple[int, ...]) -> np.ndarray | None:
  """The matrix M with ā = M · vec(mean image), for zero-padded convolutions.

  Entry ``(window offset, pixel)`` of M counts the output positions that read
  that pixel at that offset of the window (divided by the number of output
  positions): one row per offset of the kernel window (in HWIO order), one
  column per input pixel. The padding, strides and kernel dilation are the
  layer's own (Flax's SAME, VALID, CAUSAL or explicit pads). ``None`` where the
  padding is not zeros (CIRCULAR, REFLECT), with input dilation, or where M
  would be large (more than 2²⁰ entries): the caller then differentiates the
  layer's own convolution instead.
  """
  kernel_size = _kernel_size(module)
  n = len(kernel_size)
  broadcast = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))
  strides, dilation = broadcast(module.strides), broadcast(module.kernel_dilation)
  if broadcast(module.input_dilation) != (1,) * n:
    return None
  if math.prod(kernel_size) * math.prod(spatial) > 2**20:
    return None
  padding = nn.linear.canonicalize_padding(module.padding, n)
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  if padding == "CAUSAL":
    pads = [(dilated[0] - 1, 0)]
  elif padding in ("CIRCULAR", "REFLECT"):
    return None
  elif isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(spatial, dilated, strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  selection = np.ones((1, 1))
  for size, k, s, d, (lo, hi) in zip(spatial, kernel_size, strides, dilation, pads):
    outputs = (size + lo + hi - ((k - 1) * d + 1)) // s + 1
    if outputs < 1:
      return None
    axis = np.zeros((k, size))
    for offset in range(k):
      rows = np.arange(outputs) * s + offset * d - lo
      rows = rows[(rows >= 0) & (rows < size)]
      np.add.at(axis[offset], rows, 1.0)
    selection = np.kron(selection, axis / outputs)
  return selection.astype(np.float32)


def _input_factor(module: nn.Module, layer: "_Layer", x: jax.Array) -> jax.Array:
  """A = mean over rows of â âᵀ, with â = [row, 1] when the layer has a bias."""
  rows = _input_rows(module, layer.kind, x)
  if layer.has_bias:
    rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
  return jnp.einsum("ri,rj->ij", rows, rows, precision=jax.lax.Precision.HIGHEST) / rows.shape[0]


def _batch_size(module: nn.Module, kind: str, x: jax.Array) -> int:
  """Number of samples of a call: the leading axis (Dense), the batch axes (Conv)."""
  if kind == "Conv":
    return math.prod(x.shape[: x.ndim - len(_kernel_size(module)) - 1])
  return x.shape[0] if x.ndim > 1 else 1


def _output_grad_factor(cotangent: jax.Array, out_dim: int, batch: int) -> jax.Array:
  """G = N · Σ_rows (∂L/∂y)(∂L/∂y)ᵀ, with N samples and L the mean loss.

  For a loss that is a mean over N samples, N · ∂L/∂y is the per-sample
  gradient, so for one row per sample G = E[g gᵀ]; positions (sequence, conv
  output pixels) are summed within a sample, as in KFC (Grosse & Martens 2016).
  """
  rows = cotangent.reshape(-1, out_dim).astype(jnp.float32)
  return batch * jnp.einsum("ro,rp->op", rows, rows, precision=jax.lax.Precision.HIGHEST)


def _busy(fn: Callable) -> Callable:
  """Runs ``fn`` with the interceptors switched off (it applies Flax modules)."""

  def wrapped(*args):
    _local.busy = True
    try:
      return fn(*args)
    finally:
      _local.busy = False

  return wrapped


def _tap_input(x: jax.Array, probe: dict, statistics: Callable) -> jax.Array:
  """Identity on ``x`` whose VJP gives ``probe`` the cotangent ``statistics(x, due)``.

  ``probe`` is a dict of zeros (``calls`` and the requested input statistics)
  and, when the factors are gated, ``factors_due`` (1.0 or 0.0, passed to
  ``statistics`` as ``due``; ``None`` otherwise); its cotangent is the dict of
  this call's values, ``calls`` being 1 and ``factors_due`` 0.
  """

  @jax.custom_vjp
  def tap(x, probe):
    del probe
    return x

  def fwd(x, probe):
    values = statistics(x, probe.get(FACTORS_DUE))
    values[FACTORS_DUE] = jnp.zeros([], jnp.float32)
    return x, {k: _varying_like(values[k].astype(v.dtype), v) for k, v in probe.items()}

  def bwd(values, cotangent):
    return cotangent, values

  tap.defvjp(fwd, bwd)
  return tap(x, probe)


def _tap_output(
    y: jax.Array, probe: jax.Array, factor: Callable, due: jax.Array | None
) -> jax.Array:
  """Identity on ``y`` whose VJP gives ``probe`` the cotangent ``factor(∂L/∂y)``.

  With a gate ``due`` (1.0 or 0.0) the factor is computed only when it is 1
  (``lax.cond``), and is zero otherwise.
  """
  dtype = probe.dtype
  if due is None:
    due = jnp.ones([], jnp.float32)
    gated = lambda ct, _: factor(ct).astype(dtype)
  else:
    gated = lambda ct, d: _when_due(d, lambda: factor(ct).astype(dtype), probe)

  @jax.custom_vjp
  def tap(y, probe, due):
    del probe, due
    return y

  def fwd(y, probe, due):
    del probe
    return y, due

  def bwd(due, cotangent):
    return (
        cotangent,
        _varying_like(gated(cotangent, due), probe),
        _varying_like(jnp.zeros_like(due), due),
    )

  tap.defvjp(fwd, bwd)
  return tap(y, probe, due)


def _when_due(due: jax.Array | None, compute: Callable[[], jax.Array], like: jax.Array):
  """``compute()`` if the gate is open (or absent), else zeros shaped like ``like``."""
  if due is None:
    return compute()
  zeros = lambda: _varying_like(jnp.zeros(like.shape, like.dtype), like)
  return jax.lax.cond(due > 0, lambda: _varying_like(compute(), like), zeros)


def _varying_like(value: jax.Array, ref: jax.Array) -> jax.Array:
  """``value``, marked as varying over the manual axes ``ref`` varies over.

  Under ``shard_map`` a per-device value (a cotangent of a per-device input,
  a branch of a ``cond``) must say so in its type; a constant does not, so it
  is cast (``lax.pcast``). A no-op outside ``shard_map``.
  """
  missing = tuple(_varying_axes(ref) - _varying_axes(value))
  return jax.lax.pcast(value, missing, to="varying") if missing else value


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual axes ``x`` varies over (``aval.mat.varying``; ``aval.vma`` before jax 0.10)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


# ---------------------------------------------------------------------------
# The interceptors.


def _discovery_interceptor(seen: dict[Path, _Seen]):
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or getattr(_local, "busy", False):
      return out
    if module.scope is None or not module.has_variable("params", KERNEL):
      return out
    path = tuple(module.scope.path)
    kind = _kind(module)
    kernel_shape = tuple(jnp.shape(module.get_variable("params", KERNEL)))
    if kind is None:
      seen.setdefault(
          path,
          _Seen(
              type(module).__name__,
              1,
              kernel_shape,
              module.has_variable("params", BIAS),
              f"not a {_SUPPORTED} layer: its parameters get the plain gradient",
          ),
      )
      return out
    seen.setdefault(
        path,
        _Seen(
            kind,
            _output_ndim(module, kind),
            kernel_shape,
            module.has_variable("params", BIAS),
            _skip_reason(module, kind),
        ),
    )
    return out

  return interceptor


_PROBE_NAMES = (INPUT_PROBE, OUTPUT_PROBE, OUTPUT_FACTOR_PROBE)


def probed_call(
    module: nn.Module,
    layer: "_Layer",
    statistics: tuple[str, ...],
    probes: dict[str, Any],
    call: Callable[..., jax.Array],
    args: tuple,
    kwargs: dict,
    *,
    busy: bool,
) -> jax.Array:
  """One call of a captured layer with its probes: ``call(*args, **kwargs)``.

  The input goes through :func:`_tap_input` (ā, A), the output gets the
  additive ḡ probe and :func:`_tap_output` (G). ``module`` is the Linen module
  (or an equivalent one) whose geometry the statistics use; ``probes`` holds
  this call's probe values by name. ``busy`` switches the Linen interceptors off
  while the statistics apply Flax modules of their own.
  """
  x, put_back = _inputs_of(args, kwargs)
  input_probe = probes[INPUT_PROBE]

  def input_statistics(x, due):
    values = {"calls": jnp.ones([], jnp.float32)}
    if INPUT_MEAN in statistics:
      values[INPUT_MEAN] = _input_mean(module, layer.kind, x)
    if INPUT_FACTOR in statistics:
      values[INPUT_FACTOR] = _when_due(
          due,
          lambda: _input_factor(module, layer, x).astype(jnp.float32),
          input_probe[INPUT_FACTOR],
      )
    return values

  x = _tap_input(x, input_probe, _busy(input_statistics) if busy else input_statistics)
  batch = _batch_size(module, layer.kind, x)
  args, kwargs = put_back(x)
  y = call(*args, **kwargs)
  if OUTPUT_GRAD_MEAN in statistics:
    features = y.shape[y.ndim - layer.layout.output_ndim :]
    positions = y.size // max(layer.out_dim, 1)
    y = y + (probes[OUTPUT_PROBE] / positions).reshape(features).astype(y.dtype)
  if OUTPUT_GRAD_FACTOR in statistics:
    y = _tap_output(
        y,
        probes[OUTPUT_FACTOR_PROBE],
        lambda ct: _output_grad_factor(ct, layer.out_dim, batch),
        input_probe.get(FACTORS_DUE),
    )
  return y


def _capture_interceptor(layers: dict[Path, _Layer], statistics: tuple[str, ...]):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        context.method_name != "__call__"
        or getattr(_local, "busy", False)
        or module.scope is None
        or not module.has_variable("params", INPUT_PROBE)
    ):
      return next_fun(*args, **kwargs)
    layer = layers.get(tuple(module.scope.path))
    if layer is None:
      return next_fun(*args, **kwargs)
    probes = {name: module.get_variable("params", name) for name in _PROBE_NAMES
              if module.has_variable("params", name)}
    return probed_call(module, layer, statistics, probes, next_fun, args, kwargs, busy=True)

  return interceptor


# ---------------------------------------------------------------------------
# Probes in and out of the parameter tree.


def _copy_dicts(tree: Any) -> Any:
  if isinstance(tree, (dict, flax.core.FrozenDict)):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _inject(params: Any, probes: dict[Path, dict[str, Any]]) -> Any:
  """``params`` with each layer's probes next to its kernel (a new tree)."""
  tree = _copy_dicts(params)
  for path, layer_probes in probes.items():
    node = tree
    for name in path:
      node = node[name]
    node.update(layer_probes)
  if isinstance(params, flax.core.FrozenDict):
    return flax.core.freeze(tree)
  return tree


def _probes(
    layer: _Layer, statistics: tuple[str, ...], due: jax.Array | None
) -> dict[str, Any]:
  """Zero probes of one layer for the requested statistics (and the factors' gate)."""
  zeros = lambda *shape: jnp.zeros(layer.stack_shape + shape, jnp.float32)
  n_in = layer.in_dim + (1 if layer.has_bias else 0)
  inputs = {"calls": zeros()}
  if due is not None:
    inputs[FACTORS_DUE] = jnp.broadcast_to(due.astype(jnp.float32), layer.stack_shape)
  if INPUT_MEAN in statistics:
    inputs[INPUT_MEAN] = zeros(layer.in_dim)
  if INPUT_FACTOR in statistics:
    inputs[INPUT_FACTOR] = zeros(n_in, n_in)
  probes = {INPUT_PROBE: inputs}
  if OUTPUT_GRAD_MEAN in statistics:
    probes[OUTPUT_PROBE] = zeros(layer.out_dim)
  if OUTPUT_GRAD_FACTOR in statistics:
    probes[OUTPUT_FACTOR_PROBE] = zeros(layer.out_dim, layer.out_dim)
  return probes


def _layer_stats(layer: _Layer, probe_grads: dict[str, Any]) -> LayerStats:
  """The statistics of one layer from its probes' gradients, averaged over calls."""
  inputs = probe_grads[INPUT_PROBE]
  calls = jnp.maximum(inputs["calls"], 1.0)
  per_call = lambda v, n: None if v is None else v / calls.reshape(calls.shape + (1,) * n)
  return LayerStats(
      input_mean=per_call(inputs.get(INPUT_MEAN), 1),
      output_grad_mean=per_call(probe_grads.get(OUTPUT_PROBE), 1),
      input_factor=per_call(inputs.get(INPUT_FACTOR), 2),
      output_grad_factor=per_call(probe_grads.get(OUTPUT_FACTOR_PROBE), 2),
      kind=layer.kind,
      layout=layer.layout,
      has_bias=layer.has_bias,
  )


def _discover(
    loss_fn: Callable, params: Any, args: tuple, kwargs: dict
) -> tuple[dict[Path, _Layer], dict[Path, PassThrough]]:
  """The layers the loss calls, from an abstract pass (no computation)."""
  seen: dict[Path, _Seen] = {}
  with nn.intercept_methods(_discovery_interceptor(seen)):
    jax.eval_shape(lambda p: loss_fn(p, *args, **kwargs), params)
  if not isinstance(params, (dict, flax.core.FrozenDict)):
    raise TypeError(
        "eva_optax.value_and_grad differentiates its first argument, which must"
        f" be the 'params' collection (a dict); got {type(params).__name__}"
    )
  leaves = dict(flatten_with_paths(params))
  layers: dict[Path, _Layer] = {}
  skipped: dict[Path, PassThrough] = {}
  for path, s in seen.items():
    full = leaves.get(path + (KERNEL,))
    if full is None:
      continue  # not differentiated: nothing of it to precondition
    if s.skip_reason is not None:
      skipped[path] = PassThrough(s.kind, s.skip_reason)
      continue
    stack_ndim = jnp.ndim(full) - len(s.kernel_shape)
    layout = KernelLayout(stack_ndim, s.output_ndim)
    stack, in_dim, out_dim = layout.dims(tuple(jnp.shape(full)))
    layers[path] = _Layer(s.kind, layout, stack, in_dim, out_dim, s.has_bias)
  return layers, skipped


def _per_device(probes: Any, axis_name: Any) -> Any:
  """The probes made per-device over ``axis_name`` (unchanged without one).

  Each device's probes must be its own (varying over the axis): under
  shard_map the gradient of a value shared by all devices is summed over them
  (and custom VJPs must return per-device cotangents). Adding 0 · axis_index
  makes them per-device, under pmap too.
  """
  if axis_name is None:
    return probes
  index = jax.lax.axis_index(axis_name).astype(jnp.float32)
  return jax.tree.map(lambda z: z + 0.0 * index, probes)


def _global_statistics(probe_grads: dict, axis_name: Any) -> dict:
  """The probes' gradients of the global batch from those of each device's shard.

  Every statistic is a mean over the samples, averaged over the devices
  (``pmean``), except ḡ: it is the mean of ∂L/∂y for L the mean loss of the
  batch, so it carries a factor 1/batch, and the global batch is ``size``
  times a shard: ḡ = pmean(ḡ_shard) / size. (G = N·Σ_rows … already is a
  per-sample mean.)
  """
  size = jax.lax.psum(1, axis_name)
  averaged = jax.lax.pmean(probe_grads, axis_name)
  return {
      path: {
          name: value / size if name == OUTPUT_PROBE else value
          for name, value in layer.items()
      }
      for path, layer in averaged.items()
  }


def _factors_gate(factors_due: Any, statistics: tuple[str, ...]) -> jax.Array | None:
  """``None`` when the factors are always computed, else a scalar bool array."""
  if factors_due is True:
    return None
  if not any(name in statistics for name in FACTORS):
    raise ValueError(
        f"{FACTORS_DUE} gates the factors {FACTORS}, but none was asked for:"
        f" statistics={statistics!r}"
    )
  due = jnp.asarray(factors_due)
  if due.shape != () or not (due.dtype == jnp.bool_ or jnp.issubdtype(due.dtype, jnp.integer)):
    raise ValueError(
        f"{FACTORS_DUE} must be a scalar bool (e.g. eva_optax.factors_due(opt_state)),"
        f" got {factors_due!r}"
    )
  return due.astype(jnp.bool_)


def value_and_grad(
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    statistics: Sequence[str] = EVA_STATISTICS,
    axis_name: Any = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like :func:`jax.value_and_grad`, also returning per-layer curvature statistics.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning the scalar loss
      (the mean over the batch), or ``(loss, aux)`` when ``has_aux``. It calls a
      Flax Linen model with ``model.apply({'params': params, ...}, ...)``;
      mutable collections (``batch_stats``) go through ``aux`` as usual.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    statistics: which statistics to capture, among ``'input_mean'`` (ā),
      ``'output_grad_mean'`` (ḡ), ``'input_factor'`` (A = E[â âᵀ] over rows,
      â = [a, 1] with a bias) and ``'output_grad_factor'`` (G = N·Σ_rows
      (∂L/∂y)(∂L/∂y)ᵀ, the per-sample gradient covariance for a mean loss over
      N samples). Default ``('input_mean', 'output_grad_mean')``, what Eva
      needs; each optimizer documents its own (Eva-f: ``('input_mean',)``,
      which skips the backward probes). Statistics not asked for are ``None``.
    axis_name: under ``pmap`` / ``shard_map``, the name (or tuple of names) of
      the data-parallel axes: the statistics are then averaged over them
      (ḡ, which carries the 1/batch factor of the mean loss, also divided by
      the number of devices), so that they are the statistics of the global
      batch, as on one device (each device holding the same number of
      samples). The
      gradients are left to the caller, as with :func:`jax.value_and_grad`.
      Not needed under ``jit`` with a sharded batch, where every mean already
      is over the global batch.

  Returns:
    ``grad_fn(params, *args, factors_due=True, **kwargs) -> (value, grads,
    stats)``. ``factors_due`` (a scalar bool, traced or not; the one keyword
    ``grad_fn`` keeps for itself) gates the factors A and G: when it is false
    they are not computed (``lax.cond``) and come back as zeros, which the
    factor-based optimizers' running averages ignore. Pass
    :func:`eva_optax.factors_due` of the optimizer state, so that factors are
    computed exactly on the steps K-FAC / FOOF average them (``stats_every``).
    The other keyword arguments go to ``loss_fn``. ``value`` is the loss (or ``(loss, aux)``), ``grads`` the gradient w.r.t.
    ``params`` and ``stats`` a tree keyed by module path (like ``params``)
    holding a :class:`~eva_optax.LayerStats` per captured layer and a
    :class:`~eva_optax.PassThrough` per layer seen but not preconditioned. It
    calls neither ``jit`` nor ``pmap``; wrap it like any JAX function.

  Example::

      grad_fn = eva_optax.value_and_grad(loss_fn)
      loss, grads, stats = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
  """
  statistics = tuple(statistics)
  unknown = set(statistics) - set(STATISTICS)
  if unknown or not statistics:
    raise ValueError(
        f"statistics must be a non-empty subset of {STATISTICS}; got {statistics!r}"
    )

  def grad_fn(params: Any, *args: Any, **kwargs: Any):
    due = _factors_gate(kwargs.pop(FACTORS_DUE, True), statistics)
    layers, skipped = _discover(loss_fn, params, args, kwargs)
    probes = _per_device(
        {path: _probes(layer, statistics, due) for path, layer in layers.items()}, axis_name
    )

    def wrapped(params, probes):
      with nn.intercept_methods(_capture_interceptor(layers, statistics)):
        out = loss_fn(_inject(params, probes), *args, **kwargs)
      if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
          raise TypeError("has_aux=True needs loss_fn to return (loss, aux)")
        return out[0], out[1]
      return out, None

    (loss, aux), (grads, probe_grads) = jax.value_and_grad(
        wrapped, argnums=(0, 1), has_aux=True
    )(params, probes)

    if axis_name is not None:
      probe_grads = _global_statistics(probe_grads, axis_name)
    entries: dict[Path, Any] = dict(skipped)
    for path, layer_grads in probe_grads.items():
      entries[path] = _layer_stats(layers[path], layer_grads)
    value = (loss, aux) if has_aux else loss
    return value, grads, nest(entries)

  return grad_fn
