"""One-pass capture of Kronecker vectors from a Flax NNX model.

:func:`nnx_value_and_grad` is the NNX counterpart of
:func:`eva_optax.value_and_grad` (the Linen capture, :mod:`eva_optax.capture`):
like :func:`flax.nnx.value_and_grad` it returns the loss and the gradient
``nnx.State`` of the model's ``nnx.Param`` variables, and also the statistics of
every ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Conv`` call, from the same
forward and backward pass, with the conventions of the Linen capture (which
computes them; nothing is re-derived here):

* ā (``input_mean``): mean of the layer input over every non-contracted axis;
  for Conv, the batch mean image's im2col patches averaged over the output
  positions, in the kernel's HWIO order;
* ḡ (``output_grad_mean``): mean over batch and positions of ∂L/∂y for L the
  user's (mean) loss, so it carries the 1/batch factor;
* K-FAC's A (``input_factor``) and G (``output_grad_factor``) when asked.

How: NNX modules are Python objects, so the layers are found by walking the
model graph, and each supported layer gets, for the duration of the call, zero
"probe" variables next to its kernel (a private ``nnx.Variable`` type). The
``__call__`` of ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` is
wrapped for that time: on a module holding probes it adds them exactly as the
Linen capture does (an output probe added to y, an input probe whose cotangent
is ā). :func:`flax.nnx.value_and_grad` then differentiates w.r.t. the ``Param``
and probe variables together; the probes' gradients are the statistics. Since
the probes are variables of the model, NNX transforms inside the model
(``nnx.remat``, ``nnx.scan`` over a stack of layers made with ``nnx.vmap``)
carry and slice them like the kernels.

The stats tree is keyed by the module path of each layer in the model, as in
``nnx.state(model, nnx.Param)`` (list indices as strings), so that
``tx.update(grads, opt_state, params, stats=stats)`` and
``nnx.Optimizer.update(model, grads, stats=stats)`` find every layer.

References:
  Zhang, Shi, Li. Eva: Practical Second-order Optimization with
  Kronecker-vectorized Approximation. ICLR 2023.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from eva_optax.capture import (
    EVA_STATISTICS,
    FACTORS_DUE,
    STATISTICS,
    _factors_gate,
    _global_statistics,
    _Layer,
    _layer_stats,
    _per_device,
    _probes,
    probed_call,
)
from eva_optax.layers import KERNEL, KernelLayout, PassThrough, Path, nest

# NNX module type → the Linen kind whose statistics it shares (the Linen
# capture's helpers dispatch on it); the stats report the NNX name.
_KINDS = {nnx.Linear: "Dense", nnx.LinearGeneral: "DenseGeneral", nnx.Conv: "Conv"}
_SUPPORTED = "Linear, LinearGeneral or Conv"
_PREFIX = "eva_probe__"


class _Probe(nnx.Variable):
  """A zero probe of the capture: a model variable only while ``grad_fn`` runs."""


class _LayerInfo(NamedTuple):
  """Static facts about one captured layer, carried in its probes' metadata."""

  path: Path
  name: str  # the NNX kind reported in the stats
  layer: _Layer  # what the Linen capture's helpers need (Linen kind)


# ---------------------------------------------------------------------------
# Finding the layers.


def _nnx_kind(module: nnx.Module) -> type | None:
  for cls in _KINDS:
    if isinstance(module, cls):
      return cls
  return None


def _expected_kernel_ndim(module: nnx.Module, cls: type) -> int:
  """Rank of the kernel of one (unstacked) layer, from the module's attributes."""
  if cls is nnx.Linear:
    return 2
  if cls is nnx.LinearGeneral:
    return len(module.batch_axis) + len(module.in_features) + len(module.out_features)
  return len(module.kernel_size) + 2


def _output_ndim(module: nnx.Module, cls: type) -> int:
  return len(module.out_features) if cls is nnx.LinearGeneral else 1


def _skip_reason(module: nnx.Module, cls: type | None, kernel: nnx.Variable) -> str | None:
  """Why a kernel-owning module is passed through, or ``None``."""
  if cls is None:
    return f"not a {_SUPPORTED} layer: its parameters get the plain gradient"
  if cls is nnx.Conv and module.feature_group_count != 1:
    return (
        f"grouped convolution (feature_group_count={module.feature_group_count})"
        " is not preconditioned: its parameters get the plain gradient"
    )
  if cls is nnx.LinearGeneral and module.batch_axis:
    return (
        "LinearGeneral with batch_axis is not preconditioned: its parameters get"
        " the plain gradient"
    )
  if jnp.ndim(kernel[...]) < _expected_kernel_ndim(module, cls):
    return "kernel of unexpected rank: its parameters get the plain gradient"
  return None


def _find_layers(
    model: nnx.Module,
) -> tuple[dict[Path, tuple[nnx.Module, _LayerInfo]], dict[Path, PassThrough]]:
  """Every module of ``model`` owning an ``nnx.Param`` kernel, by module path."""
  layers: dict[Path, tuple[nnx.Module, _LayerInfo]] = {}
  skipped: dict[Path, PassThrough] = {}
  for keys, module in nnx.iter_graph(model, graph=True):
    if not isinstance(module, nnx.Module):
      continue
    kernel = getattr(module, KERNEL, None)
    if not isinstance(kernel, nnx.Param):
      continue  # no kernel, or not differentiated: nothing to precondition
    path = tuple(str(k) for k in keys)
    cls = _nnx_kind(module)
    reason = _skip_reason(module, cls, kernel)
    name = type(module).__name__ if cls is None else cls.__name__
    if reason is not None:
      skipped[path] = PassThrough(name, reason)
      continue
    shape = tuple(jnp.shape(kernel[...]))
    stack_ndim = len(shape) - _expected_kernel_ndim(module, cls)
    layout = KernelLayout(stack_ndim, _output_ndim(module, cls))
    stack, in_dim, out_dim = layout.dims(shape)
    has_bias = isinstance(getattr(module, "bias", None), nnx.Param)
    layer = _Layer(_KINDS[cls], layout, stack, in_dim, out_dim, has_bias)
    layers[path] = (module, _LayerInfo(path, name, layer))
  return layers, skipped


# ---------------------------------------------------------------------------
# The probes: the Linen capture's probe dict, as variables of the module.


def _flat_names(probes: dict[str, Any]) -> dict[str, tuple[str, ...]]:
  """Attribute name → key path in the Linen probe dict (``_probes``)."""
  names = {}
  for key, value in probes.items():
    if isinstance(value, dict):
      for sub in value:
        names[f"{_PREFIX}{key}__{sub}"] = (key, sub)
    else:
      names[f"{_PREFIX}{key}"] = (key,)
  return names


def _attach(module: nnx.Module, info: _LayerInfo, probes: dict[str, Any]) -> list[str]:
  names = _flat_names(probes)
  for attr, keys in names.items():
    value = probes[keys[0]] if len(keys) == 1 else probes[keys[0]][keys[1]]
    setattr(module, attr, _Probe(value, eva_layer=info))
  return list(names)


def _probe_values(module: nnx.Module) -> tuple[_LayerInfo, dict[str, Any]] | None:
  """The layer info and the probe dict (Linen format) of a module, if it has probes."""
  probes: dict[str, Any] = {}
  info = None
  for attr, value in vars(module).items():
    if not (attr.startswith(_PREFIX) and isinstance(value, _Probe)):
      continue
    info = value.get_metadata()["eva_layer"]
    keys = attr[len(_PREFIX) :].split("__")
    if len(keys) == 1:
      probes[keys[0]] = value[...]
    else:
      probes.setdefault(keys[0], {})[keys[1]] = value[...]
  return None if info is None else (info, probes)


def _probe_grads(grads: nnx.State) -> dict[Path, dict[str, Any]]:
  """The probes' gradients per layer path, in the Linen probe-dict format."""
  out: dict[Path, dict[str, Any]] = {}
  for keys, var in nnx.to_flat_state(grads):
    info = var.get_metadata()["eva_layer"]
    names = str(keys[-1])[len(_PREFIX) :].split("__")
    layer = out.setdefault(info.path, {})
    if len(names) == 1:
      layer[names[0]] = var[...]
    else:
      layer.setdefault(names[0], {})[names[1]] = var[...]
  return out


# ---------------------------------------------------------------------------
# The wrapped __call__.


_local = threading.local()
_patch_lock = threading.Lock()
_patch_depth = 0
_originals: dict[type, Callable] = {}


def _linen_twin(module: nnx.Module, kind: str) -> nn.Module:
  """A Linen module of the same geometry, for the Linen capture's helpers."""
  if kind == "Dense":
    return nn.Dense(features=module.out_features, parent=None)
  if kind == "DenseGeneral":
    return nn.DenseGeneral(features=module.out_features, axis=module.axis, parent=None)
  return nn.Conv(
      features=module.out_features,
      kernel_size=tuple(module.kernel_size),
      strides=module.strides,
      padding=module.padding,
      input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation,
      feature_group_count=module.feature_group_count,
      use_bias=module.use_bias,
      parent=None,
  )


def _captured_call(original: Callable) -> Callable:
  @functools.wraps(original)
  def __call__(self, *args, **kwargs):
    found = _probe_values(self)
    if found is None:
      return original(self, *args, **kwargs)
    info, probes = found
    layer = info.layer
    statistics = _local.statistics
    _local.called.add(info.path)
    twin = _linen_twin(self, layer.kind)
    call = lambda *a, **k: original(self, *a, **k)
    return probed_call(twin, layer, statistics, probes, call, args, kwargs, busy=False)

  return __call__


@contextlib.contextmanager
def _capturing(statistics: tuple[str, ...]):
  """Wraps the supported ``__call__`` methods (once, however nested) and
  collects the paths of the layers called."""
  global _patch_depth
  with _patch_lock:
    if _patch_depth == 0:
      for cls in _KINDS:
        _originals[cls] = cls.__dict__["__call__"]
        cls.__call__ = _captured_call(_originals[cls])
    _patch_depth += 1
  outer = getattr(_local, "statistics", None), getattr(_local, "called", None)
  _local.statistics, _local.called = statistics, set()
  try:
    yield _local.called
  finally:
    _local.statistics, _local.called = outer
    with _patch_lock:
      _patch_depth -= 1
      if _patch_depth == 0:
        for cls, original in _originals.items():
          cls.__call__ = original
        _originals.clear()


# ---------------------------------------------------------------------------
# The gradient function.


def nnx_value_and_grad(
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    statistics: Sequence[str] = EVA_STATISTICS,
    axis_name: Any = None,
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like :func:`flax.nnx.value_and_grad`, also returning per-layer statistics.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning the scalar loss (the
      mean over the batch), or ``(loss, aux)`` when ``has_aux``. ``model`` is
      an ``nnx.Module``; updates of its other variables (BatchNorm statistics,
      RNG counts) reach the model, as with :func:`flax.nnx.value_and_grad`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    statistics: which statistics to capture, as for
      :func:`eva_optax.value_and_grad` (default ``('input_mean',
      'output_grad_mean')``, what Eva needs; ``eva_optax.KFAC_STATISTICS`` for
      K-FAC, …).
    axis_name: under ``pmap`` / ``shard_map``, the data-parallel axis name(s):
      the statistics become those of the global batch, as in
      :func:`eva_optax.value_and_grad`.

  Returns:
    ``grad_fn(model, *args, factors_due=True, **kwargs) -> (value, grads,
    stats)``: ``value`` the loss (or ``(loss, aux)``), ``grads`` the
    ``nnx.State`` of the ``nnx.Param`` gradients (as
    ``nnx.value_and_grad(loss_fn)`` gives), ``stats`` a tree keyed by module
    path like ``nnx.state(model, nnx.Param)`` holding a
    :class:`~eva_optax.LayerStats` per ``Linear`` / ``LinearGeneral`` /
    ``Conv`` called (``kind`` is the NNX class name) and a
    :class:`~eva_optax.PassThrough` per other module owning an ``nnx.Param``
    ``kernel`` (``Einsum``, ``ConvTranspose``, grouped convolutions,
    ``LinearGeneral`` with ``batch_axis``, layers ``loss_fn`` did not call).
    ``factors_due`` gates the K-FAC factors, as for
    :func:`eva_optax.value_and_grad`.

  Example::

      grad_fn = eva_optax.nnx_value_and_grad(loss_fn)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

      @nnx.jit
      def train_step(model, optimizer, x, y):
        loss, grads, stats = grad_fn(model, x, y)
        optimizer.update(model, grads, stats=stats)
        return loss
  """
  statistics = tuple(statistics)
  unknown = set(statistics) - set(STATISTICS)
  if unknown or not statistics:
    raise ValueError(
        f"statistics must be a non-empty subset of {STATISTICS}; got {statistics!r}"
    )

  def wrapped(model, *args, **kwargs):
    out = loss_fn(model, *args, **kwargs)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("has_aux=True needs loss_fn to return (loss, aux)")
      return out[0], out[1]
    return out, None

  value_and_grad = nnx.value_and_grad(
      wrapped,
      argnums=nnx.DiffState(0, nnx.Any(nnx.Param, _Probe)),
      has_aux=True,
      graph=True,
      graph_updates=True,
  )

  def grad_fn(model: nnx.Module, *args: Any, **kwargs: Any):
    if not isinstance(model, nnx.Module):
      raise TypeError(
          "eva_optax.nnx_value_and_grad differentiates its first argument, which"
          f" must be an nnx.Module; got {type(model).__name__}"
      )
    due = _factors_gate(kwargs.pop(FACTORS_DUE, True), statistics)
    layers, skipped = _find_layers(model)
    attached: list[tuple[nnx.Module, list[str]]] = []
    try:
      for module, info in layers.values():
        probes = _per_device(_probes(info.layer, statistics, due), axis_name)
        attached.append((module, _attach(module, info, probes)))
      with _capturing(statistics) as called:
        (loss, aux), grads = value_and_grad(model, *args, **kwargs)
        called = set(called)
    finally:
      for module, names in attached:
        for name in names:
          delattr(module, name)

    probe_state, grads = nnx.split_state(grads, _Probe, ...)
    probe_grads = {p: g for p, g in _probe_grads(probe_state).items() if p in called}
    if axis_name is not None:
      probe_grads = _global_statistics(probe_grads, axis_name)
    entries: dict[Path, Any] = dict(skipped)
    for path, (_, info) in layers.items():
      if path not in called:
        entries[path] = PassThrough(
            info.name,
            f"not called by loss_fn through {info.name}.__call__ (no statistics):"
            " its parameters get the plain gradient",
        )
        continue
      stats = _layer_stats(info.layer, probe_grads[path])
      entries[path] = dataclasses.replace(stats, kind=info.name)
    value = (loss, aux) if has_aux else loss
    return value, grads, nest(entries)

  return grad_fn


__all__ = ["nnx_value_and_grad"]
