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
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

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


def _dense_input_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(-1, x.shape[-1]).astype(jnp.float32), axis=0)


def _dense_general_input_mean(module: nn.Module, x: jax.Array) -> jax.Array:
  axis = nn.linear._normalize_axes(
      nn.linear._canonicalize_tuple(module.axis), x.ndim
  )
  moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  in_dim = math.prod(x.shape[a] for a in axis)
  return jnp.mean(moved.reshape(-1, in_dim).astype(jnp.float32), axis=0)


def _conv_input_mean(module: nn.Module, x: jax.Array) -> jax.Array:
  """Batch mean first, then the mean of its im2col patches, in HWIO order.

  The patch mean is the gradient, w.r.t. a one-output kernel, of the mean over
  positions of the layer's own convolution of the mean image: convolution is
  linear in the kernel, so this reuses Flax's handling of every padding mode
  (SAME, VALID, explicit, CIRCULAR, REFLECT, CAUSAL), stride and dilation.
  """
  kernel_size = (
      (module.kernel_size,)
      if isinstance(module.kernel_size, int)
      else tuple(module.kernel_size)
  )
  spatial = x.shape[x.ndim - len(kernel_size) - 1 :]
  images = x.reshape((-1,) + spatial).astype(jnp.float32)
  mean_image = jnp.mean(images, axis=0, keepdims=True)
  fields = {
      f.name: getattr(module, f.name)
      for f in dataclasses.fields(nn.Conv)
      if f.init and f.name not in ("parent", "name")
  }
  fields.update(
      features=1,
      use_bias=False,
      mask=None,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      precision=jax.lax.Precision.HIGHEST,
  )
  probe_conv = nn.Conv(**fields)
  kernel = jnp.zeros(kernel_size + (spatial[-1], 1), jnp.float32)
  conv = lambda k: probe_conv.apply({"params": {KERNEL: k}}, mean_image)
  out, vjp = jax.vjp(conv, kernel)
  (patch_mean,) = vjp(jnp.full(out.shape, 1.0 / out.size, out.dtype))
  return patch_mean.reshape(-1)


def _input_mean(module: nn.Module, kind: str, x: jax.Array) -> jax.Array:
  _local.busy = True
  try:
    if kind == "Dense":
      return _dense_input_mean(x)
    if kind == "DenseGeneral":
      return _dense_general_input_mean(module, x)
    return _conv_input_mean(module, x)
  finally:
    _local.busy = False


def _tap_input(x: jax.Array, probe: jax.Array, input_mean: Callable) -> jax.Array:
  """Identity on ``x`` whose VJP gives ``probe`` the cotangent ``[ā, 1]``."""

  @jax.custom_vjp
  def tap(x, probe):
    del probe
    return x

  def fwd(x, probe):
    stat = input_mean(x)
    return x, jnp.concatenate([stat, jnp.ones((1,), stat.dtype)]).astype(probe.dtype)

  def bwd(stat, cotangent):
    return cotangent, stat

  tap.defvjp(fwd, bwd)
  return tap(x, probe)


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


def _capture_interceptor(layers: dict[Path, _Layer]):
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
    input_probe = module.get_variable("params", INPUT_PROBE)
    output_probe = module.get_variable("params", OUTPUT_PROBE)
    x, put_back = _inputs_of(args, kwargs)
    x = _tap_input(x, input_probe, lambda x: _input_mean(module, layer.kind, x))
    args, kwargs = put_back(x)
    y = next_fun(*args, **kwargs)
    features = y.shape[y.ndim - layer.layout.output_ndim :]
    positions = y.size // max(layer.out_dim, 1)
    return y + (output_probe / positions).reshape(features).astype(y.dtype)

  return interceptor


# ---------------------------------------------------------------------------
# Probes in and out of the parameter tree.


def _copy_dicts(tree: Any) -> Any:
  if isinstance(tree, (dict, flax.core.FrozenDict)):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _inject(params: Any, probes: dict[Path, tuple[jax.Array, jax.Array]]) -> Any:
  """``params`` with each layer's probes next to its kernel (a new tree)."""
  tree = _copy_dicts(params)
  for path, (input_probe, output_probe) in probes.items():
    node = tree
    for name in path:
      node = node[name]
    node[INPUT_PROBE] = input_probe
    node[OUTPUT_PROBE] = output_probe
  if isinstance(params, flax.core.FrozenDict):
    return flax.core.freeze(tree)
  return tree


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


def value_and_grad(
    loss_fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like :func:`jax.value_and_grad`, also returning Eva's statistics.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning the scalar loss
      (the mean over the batch), or ``(loss, aux)`` when ``has_aux``. It calls a
      Flax Linen model with ``model.apply({'params': params, ...}, ...)``;
      mutable collections (``batch_stats``) go through ``aux`` as usual.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(params, *args, **kwargs) -> (value, grads, stats)``, with
    ``value`` the loss (or ``(loss, aux)``), ``grads`` the gradient w.r.t.
    ``params`` and ``stats`` a tree keyed by module path (like ``params``)
    holding a :class:`~eva_optax.LayerStats` per captured layer and a
    :class:`~eva_optax.PassThrough` per layer seen but not preconditioned. It
    calls neither ``jit`` nor ``pmap``; wrap it like any JAX function. Under
    ``pmap``, ``jax.lax.pmean`` the stats like the gradients.

  Example::

      grad_fn = eva_optax.value_and_grad(loss_fn)
      loss, grads, stats = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
  """

  def grad_fn(params: Any, *args: Any, **kwargs: Any):
    layers, skipped = _discover(loss_fn, params, args, kwargs)
    probes = {
        path: (
            jnp.zeros(layer.stack_shape + (layer.in_dim + 1,), jnp.float32),
            jnp.zeros(layer.stack_shape + (layer.out_dim,), jnp.float32),
        )
        for path, layer in layers.items()
    }

    def wrapped(params, probes):
      with nn.intercept_methods(_capture_interceptor(layers)):
        out = loss_fn(_inject(params, probes), *args, **kwargs)
      if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
          raise TypeError("has_aux=True needs loss_fn to return (loss, aux)")
        return out[0], out[1]
      return out, None

    (loss, aux), (grads, probe_grads) = jax.value_and_grad(
        wrapped, argnums=(0, 1), has_aux=True
    )(params, probes)

    entries: dict[Path, Any] = dict(skipped)
    for path, (input_grad, output_grad) in probe_grads.items():
      layer = layers[path]
      calls = jnp.maximum(input_grad[..., -1:], 1.0)
      entries[path] = LayerStats(
          input_mean=input_grad[..., :-1] / calls,
          output_grad_mean=output_grad / calls,
          kind=layer.kind,
          layout=layer.layout,
          has_bias=layer.has_bias,
      )
    value = (loss, aux) if has_aux else loss
    return value, grads, nest(entries)

  return grad_fn
