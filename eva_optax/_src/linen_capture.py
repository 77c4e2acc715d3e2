"""The Linen front-end of the capture: :func:`value_and_grad`.

:func:`value_and_grad` works like :func:`jax.value_and_grad` and also returns,
from the same forward and backward pass, the statistics of every ``nn.Dense``,
``nn.DenseGeneral``, ``nn.Conv`` and ``nn.Einsum`` call of the model, without changes to the
model (``flax.linen.intercept_methods``). What the statistics are and how the
probes deliver them is the capture's core (:mod:`eva_optax._src.capture`); this
module only finds the layers and hands each call to the core:

* before the real pass, an abstract pass (``jax.eval_shape``) with a discovery
  interceptor records every module owning a ``kernel``, and describes each
  supported one by a :class:`~eva_optax._src.capture.Layer` (its geometry read
  from the module's attributes);
* the zero probes of each layer go into the parameter tree next to its kernel,
  so that lifted transforms (``nn.scan``, ``nn.remat``) slice and carry them;
* the capture interceptor runs each call of a layer through
  :func:`~eva_optax._src.capture.probed_call`.

References:
  Zhang, Shi, Li. Eva: Practical Second-order Optimization with
  Kronecker-vectorized Approximation. ICLR 2023.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
from flax import nnx
import jax.numpy as jnp

from eva_optax._src import capture
from eva_optax._src import flax_layouts  # noqa: F401 (Flax's names reach init)
from eva_optax._src.capture import FACTORS_DUE, PROBES, ConvGeometry, DenseGeometry, Layer
from eva_optax._src.paths import BIAS, KERNEL, Path, flatten_with_paths
from eva_optax._src.statistics import EVA_STATISTICS, PassThrough, check_factor_rows, requested

_SUPPORTED = "Dense, DenseGeneral, Conv or Einsum"


class _Seen(NamedTuple):
  """What the abstract pass saw of one module owning a kernel (static)."""

  kind: str
  kernel_ndim: int  # the rank of the kernel inside the module (unstacked)
  output_ndim: int
  has_bias: bool
  geometry: DenseGeometry | ConvGeometry | None
  skip_reason: str | None
  dtype: Any = None  # the kernel's


def _kind(module: nn.Module) -> str | None:
  if isinstance(module, nn.Dense):
    return "Dense"
  if isinstance(module, nn.DenseGeneral):
    return "DenseGeneral"
  if isinstance(module, nn.Conv):
    return "Conv"
  if isinstance(module, nn.Einsum):
    return "Einsum"
  return None


def _skip_reason(module: nn.Module, kind: str, geometry: Any) -> str | None:
  """Why a supported layer kind is still passed through, or ``None``."""
  if isinstance(geometry, str):
    return f"{geometry}: its parameters get the plain gradient"
  if kind == "DenseGeneral" and tuple(nn.linear._canonicalize_tuple(module.batch_dims)):
    return (
      "DenseGeneral with batch_dims is not preconditioned: its parameters get the plain gradient"
    )
  return None


def _output_ndim(module: nn.Module, kind: str) -> int:
  if kind == "DenseGeneral":
    return len(nn.linear._canonicalize_tuple(module.features))
  return 1


def _einsum_str(module: nn.Module, args: tuple, kwargs: dict) -> str | None:
  """The equation of an ``nn.Einsum`` call (the call's argument wins, as in Flax)."""
  if "einsum_str" in kwargs and kwargs["einsum_str"] is not None:
    return kwargs["einsum_str"]
  if len(args) > 1 and args[1] is not None:
    return args[1]
  return module.einsum_str


def _geometry(module: nn.Module, kind: str, args: tuple = (), kwargs: dict | None = None) -> Any:
  """How the module maps its input, from its attributes (Flax's conventions);
  for an unsupported Einsum equation, the reason (a string)."""
  if kind == "Einsum":
    return capture.einsum_geometry(_einsum_str(module, args, kwargs or {}))
  if kind == "Dense":
    return DenseGeometry((-1,))
  if kind == "DenseGeneral":
    return DenseGeometry(tuple(nn.linear._canonicalize_tuple(module.axis)))
  ks = module.kernel_size
  kernel_size = (ks,) if isinstance(ks, int) else tuple(ks)
  n = len(kernel_size)
  return ConvGeometry(
    kernel_size,
    capture.per_axis(module.strides, n),
    capture.canonical_padding(module.padding, n),
    capture.per_axis(module.input_dilation, n),
    capture.per_axis(module.kernel_dilation, n),
    module.feature_group_count,
  )


# ---------------------------------------------------------------------------
# The interceptors.


def _discovery_interceptor(seen: dict[Path, _Seen]):
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
      return out
    if module.scope is None or not module.has_variable("params", KERNEL):
      return out
    kind = _kind(module)
    # Unboxed: parameters with partitioning metadata (nn.with_logical_partitioning).
    kernel = flax.core.meta.unbox(module.get_variable("params", KERNEL))
    kernel_ndim = jnp.ndim(kernel)
    has_bias = module.has_variable("params", BIAS)
    if kind is None:
      note = _Seen(
        type(module).__name__,
        kernel_ndim,
        1,
        has_bias,
        None,
        f"not a {_SUPPORTED} layer: its parameters get the plain gradient",
      )
    else:
      geometry = _geometry(module, kind, args, kwargs)
      reason = _skip_reason(module, kind, geometry)
      note = _Seen(
        kind,
        kernel_ndim,
        _output_ndim(module, kind),
        has_bias,
        None if reason else geometry,
        reason,
        jnp.result_type(kernel),
      )
    seen.setdefault(tuple(module.scope.path), note)
    return out

  return interceptor


def _capture_interceptor(layers: dict[Path, Layer], statistics: tuple[str, ...]):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name != "__call__"
      or module.scope is None
      or not module.has_variable("params", capture.INPUT_PROBE)
    ):
      return next_fun(*args, **kwargs)
    layer = layers.get(tuple(module.scope.path))
    if layer is None:
      return next_fun(*args, **kwargs)
    probes = {
      name: module.get_variable("params", name)
      for name in PROBES
      if module.has_variable("params", name)
    }
    return capture.probed_call(layer, statistics, probes, next_fun, args, kwargs)

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


def _check_params(params: Any, argnums: int) -> None:
  """The differentiated argument must be the 'params' collection (a dict)."""
  if isinstance(params, (dict, flax.core.FrozenDict)):
    return
  which = "its first argument" if argnums == 0 else f"the argument argnums={argnums}"
  if isinstance(params, nnx.Module):
    raise TypeError(
      f"eva_optax.value_and_grad is the Linen capture: {which} must be the"
      f" 'params' collection (a dict), and it got an NNX module"
      f" ({type(params).__name__}). For NNX models use"
      " eva_optax.nnx_value_and_grad(loss_fn), with loss_fn(model, ...), and"
      " pass its stats on: optimizer.update(model, grads, stats=stats)"
    )
  raise TypeError(
    f"eva_optax.value_and_grad differentiates {which}, which must be the"
    f" 'params' collection (a dict); got {type(params).__name__}"
  )


def _check_not_whole_variables(seen: dict[Path, _Seen], leaves: dict[Path, Any]) -> None:
  """The differentiated tree is the 'params' collection, not the whole variables
  dict: with ``{'params': ...}`` at its top, no kernel is where the model's
  modules are, and every layer would be left without statistics."""
  direct = [p for p in seen if p + (KERNEL,) in leaves]
  nested = [p for p in seen if ("params",) + p + (KERNEL,) in leaves]
  if direct or not nested:
    return
  raise ValueError(
    "eva_optax.value_and_grad differentiates the 'params' collection itself, and"
    " got the whole variables dict ({'params': ...} at its top): the model's"
    f" layers ({', '.join(sorted('/'.join(p) for p in nested))}) have their"
    " kernels under 'params' there, so none would get statistics. Pass"
    " variables['params'] and rebuild the dict in the loss:"
    " loss_fn(params, batch) calling model.apply({'params': params,"
    " **other_collections}, x), grad_fn(variables['params'], batch)"
  )


def _discover(
  loss_fn: Callable, params: Any, args: tuple, kwargs: dict, argnums: int = 0
) -> tuple[dict[Path, Layer], dict[Path, PassThrough]]:
  """The layers the loss calls, from an abstract pass (no computation)."""
  _check_params(params, argnums)
  seen: dict[Path, _Seen] = {}
  with nn.intercept_methods(_discovery_interceptor(seen)):
    jax.eval_shape(lambda p: loss_fn(p, *args, **kwargs), params)
  leaves = dict(flatten_with_paths(params))
  _check_not_whole_variables(seen, leaves)
  layers: dict[Path, Layer] = {}
  skipped: dict[Path, PassThrough] = {}
  for path, s in seen.items():
    full = leaves.get(path + (KERNEL,))
    if full is None:
      continue  # not differentiated: nothing of it to precondition
    if s.skip_reason is not None:
      skipped[path] = PassThrough(s.kind, s.skip_reason)
      continue
    layers[path] = capture.layer_record(
      s.kind,
      s.geometry,
      tuple(jnp.shape(full)),
      s.kernel_ndim,
      s.output_ndim,
      s.has_bias,
      jnp.result_type(full),
    )
  return layers, skipped


def value_and_grad(
  loss_fn: Callable[..., Any],
  argnums: int = 0,
  has_aux: bool = False,
  *,
  statistics: Sequence[str] = EVA_STATISTICS,
  axis_name: Any = None,
  factor_rows: str = "positions",
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like :func:`jax.value_and_grad`, also returning per-layer curvature statistics.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning the scalar loss
      (the mean over the batch), or ``(loss, aux)`` when ``has_aux``. It calls a
      Flax Linen model with ``model.apply({'params': params, ...}, ...)``;
      mutable collections (``batch_stats``) go through ``aux`` as usual.
      ``params`` is the ``'params'`` collection itself, not the whole
      variables dict ``{'params': ...}`` (an error: no layer would get
      statistics).
    argnums: the position of the argument holding ``params`` among the
      positional arguments of ``loss_fn`` (an int, default 0), as for
      :func:`jax.value_and_grad`: with ``argnums=1``, ``loss_fn(batch, params)``
      and ``grad_fn(batch, params)``. Only that argument is differentiated
      (one int, not a tuple).
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
    factor_rows: what a row of the factors A and G is: ``'positions'``
      (default; every position of every sample, G scaled to the per-sample
      gradients: KFC) or ``'samples'`` (one row per sample, the mean over its
      positions, and G of the mean loss's gradients, as the authors' K-FAC
      computes them; :func:`eva_optax.kfac` documents the whole recipe).
      Only A and G depend on it.

  Returns:
    ``grad_fn(params, *args, factors_due=True, **kwargs) -> (value, grads, stats)``,
    ``params`` at position ``argnums``. ``factors_due`` (a scalar bool, traced or
    not; the one keyword ``grad_fn`` keeps for itself) gates the factors A and G:
    when it is false they are not computed (``lax.cond``) and come back as zeros,
    which the factor-based optimizers' running averages ignore. Pass
    :func:`eva_optax.factors_due` of the optimizer state, so that factors are
    computed exactly on the steps K-FAC / FOOF average them (``stats_every``). The
    other keyword arguments go to ``loss_fn``. ``value`` is the loss (or ``(loss,
    aux)``), ``grads`` the gradient w.r.t. ``params`` and ``stats`` a tree keyed by
    module path (like ``params``) holding a :class:`~eva_optax.LayerStats` per
    captured layer and a :class:`~eva_optax.PassThrough` per layer seen but not
    preconditioned. It calls neither ``jit`` nor ``pmap``; wrap it like any JAX
    function. The first trace of ``grad_fn`` warns once
    (:class:`eva_optax.PassThroughWarning`) of the modules owning a kernel that it
    passes through (``nn.ConvTranspose``, …): their parameters get the plain
    gradient.

  Example::

      grad_fn = eva_optax.value_and_grad(loss_fn)
      loss, grads, stats = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
  """
  statistics = requested(statistics)
  check_factor_rows(factor_rows)
  front_end = "eva_optax.value_and_grad"
  argnums = capture.check_argnums(argnums, front_end)
  warned: set = set()  # the sets of pass-through modules already warned of

  def grad_fn(*args: Any, **kwargs: Any):
    params, args = capture.move_to_front(args, argnums, front_end)
    due = capture.factors_gate(kwargs.pop(FACTORS_DUE, True), statistics)
    call = lambda p, *a, **k: loss_fn(*capture.put_back(p, a, argnums), **k)
    layers, skipped = _discover(call, params, args, kwargs, argnums)
    capture.warn_pass_through(skipped, warned, front_end)
    layers = {p: l._replace(factor_rows=factor_rows) for p, l in layers.items()}
    probes = capture.per_device(
      {path: capture.zero_probes(layer, statistics, due) for path, layer in layers.items()},
      axis_name,
    )

    def wrapped(params, probes):
      with nn.intercept_methods(_capture_interceptor(layers, statistics)):
        out = call(_inject(params, probes), *args, **kwargs)
      return capture.loss_and_aux(out, has_aux)

    (loss, aux), (grads, probe_grads) = jax.value_and_grad(wrapped, argnums=(0, 1), has_aux=True)(
      params, probes
    )

    value = (loss, aux) if has_aux else loss
    return value, grads, capture.stats_tree(probe_grads, layers, skipped, axis_name)

  return grad_fn
