"""The NNX front-end of the capture: :func:`nnx_value_and_grad`.

:func:`nnx_value_and_grad` is the NNX counterpart of
:func:`eva_optax.value_and_grad` (the Linen front-end): like
:func:`flax.nnx.value_and_grad` it returns the loss and the gradient
``nnx.State`` of the model's ``nnx.Param`` variables, and also the statistics of
every ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Einsum`` call, from the same
forward and backward pass. What the statistics are and how the probes deliver
them is the capture's core (:mod:`eva_optax._src.capture`), shared with Linen:

* ā (``input_mean``): mean of the layer input over every non-contracted axis;
  for Conv, the batch mean image's im2col patches averaged over the output
  positions, in the kernel's HWIO order;
* ḡ (``output_grad_mean``): mean over batch and positions of ∂L/∂y for L the
  user's (mean) loss, so it carries the 1/batch factor;
* K-FAC's A (``input_factor``) and G (``output_grad_factor``) when asked.

How: NNX modules are Python objects, so the layers are found by walking the
model graph, each described by a :class:`~eva_optax._src.capture.Layer` read
from the module's attributes. For the duration of the call, each such module
gets zero "probe" variables next to its kernel (a private ``nnx.Variable``
type whose metadata names the layer and the probe entry), and its class is
swapped, on that instance only, for a subclass whose ``__call__`` runs the
original through :func:`~eva_optax._src.capture.probed_call`; nothing is
patched process-wide, and other instances, threads and models are untouched.
:func:`flax.nnx.value_and_grad` then differentiates w.r.t. the ``Param`` and
probe variables together; the probes' gradients are the statistics. Since the
probes are variables of the model (and the swapped class is part of its graph),
NNX transforms inside the model (``nnx.remat``, ``nnx.scan`` over a stack of
layers made with ``nnx.vmap``) carry and slice them like the kernels.

A subclass of a supported layer that overrides ``__call__`` is passed through
(by name, in the stats): what it computes is not known to be x·W + b.

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
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from eva_optax._src import capture
from eva_optax._src import flax_layouts  # noqa: F401 (Flax's names reach init)
from eva_optax._src.capture import FACTORS_DUE, ConvGeometry, DenseGeometry, Layer
from eva_optax._src.paths import KERNEL, Path
from eva_optax._src.statistics import EVA_STATISTICS, PassThrough, check_factor_rows, requested

_KINDS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)
_SUPPORTED = "Linear, LinearGeneral, Conv or Einsum"
_PREFIX = "eva_probe_"


class _Probe(nnx.Variable):
  """A zero probe of the capture: a model variable only while ``grad_fn`` runs."""


class _Tag(NamedTuple):
  """What a probe variable says about itself (its metadata; static, hashable)."""

  path: Path  # the module path of its layer
  layer: Layer
  statistics: tuple[str, ...]
  key: tuple[str, ...]  # its entry in the core's probe dict, e.g. (INPUT_PROBE, 'calls')


# ---------------------------------------------------------------------------
# Finding the layers.


def _kind_of(module: nnx.Module) -> type | None:
  for cls in _KINDS:
    if isinstance(module, cls):
      return cls
  return None


def _kernel_ndim(module: nnx.Module, cls: type) -> int:
  """Rank of the kernel of one (unstacked) layer, from the module's attributes."""
  if cls is nnx.Linear:
    return 2
  if cls is nnx.LinearGeneral:
    return len(module.batch_axis) + len(module.in_features) + len(module.out_features)
  if cls is nnx.Einsum:
    return len(module.kernel_shape)
  return len(module.kernel_size) + 2


def _geometry(module: nnx.Module, cls: type) -> Any:
  if cls is nnx.Einsum:
    return capture.einsum_geometry(module.einsum_str)
  if cls is nnx.Linear:
    return DenseGeometry((-1,))
  if cls is nnx.LinearGeneral:
    return DenseGeometry(tuple(module.axis))
  kernel_size = tuple(module.kernel_size)
  n = len(kernel_size)
  return ConvGeometry(
    kernel_size,
    capture.per_axis(module.strides, n),
    capture.canonical_padding(module.padding, n),
    capture.per_axis(module.input_dilation, n),
    capture.per_axis(module.kernel_dilation, n),
    module.feature_group_count,
  )


def _skip_reason(
  module: nnx.Module, cls: type | None, kernel: nnx.Variable, geometry: Any
) -> str | None:
  """Why a kernel-owning module is passed through, or ``None``."""
  if cls is None:
    return f"not a {_SUPPORTED} layer: its parameters get the plain gradient"
  if type(module).__call__ is not cls.__call__:
    return (
      f"{type(module).__name__} overrides {cls.__name__}.__call__, so what it"
      " computes is not known to be x·W + b: its parameters get the plain gradient"
    )
  if cls is nnx.LinearGeneral and module.batch_axis:
    return (
      "LinearGeneral with batch_axis is not preconditioned: its parameters get the plain gradient"
    )
  if isinstance(geometry, str):  # an Einsum equation the statistics do not describe
    return f"{geometry}: its parameters get the plain gradient"
  if jnp.ndim(kernel[...]) < _kernel_ndim(module, cls):
    return "kernel of unexpected rank: its parameters get the plain gradient"
  return None


def _find_layers(
  model: nnx.Module,
) -> tuple[dict[Path, tuple[nnx.Module, Layer]], dict[Path, PassThrough]]:
  """Every module of ``model`` owning an ``nnx.Param`` kernel, by module path."""
  layers: dict[Path, tuple[nnx.Module, Layer]] = {}
  skipped: dict[Path, PassThrough] = {}
  for keys, module in nnx.iter_graph(model, graph=True):
    if not isinstance(module, nnx.Module):
      continue
    kernel = getattr(module, KERNEL, None)
    if not isinstance(kernel, nnx.Param):
      continue  # no kernel, or not differentiated: nothing to precondition
    path = tuple(str(k) for k in keys)
    cls = _kind_of(module)
    geometry = None if cls is None else _geometry(module, cls)
    reason = _skip_reason(module, cls, kernel, geometry)
    name = type(module).__name__ if cls is None else cls.__name__
    if reason is not None:
      skipped[path] = PassThrough(name, reason)
      continue
    output_ndim = len(module.out_features) if cls is nnx.LinearGeneral else 1
    has_bias = isinstance(getattr(module, "bias", None), nnx.Param)
    layers[path] = (
      module,
      capture.layer_record(
        name,
        geometry,
        tuple(jnp.shape(kernel[...])),
        _kernel_ndim(module, cls),
        output_ndim,
        has_bias,
        jnp.result_type(kernel[...]),
      ),
    )
  return layers, skipped


# ---------------------------------------------------------------------------
# The probes, as variables of their module.


def _entries(probes: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
  """The core's probe dict as ``(key, value)`` pairs (one level of nesting)."""
  out = []
  for name, value in probes.items():
    if isinstance(value, dict):
      out.extend(((name, sub), v) for sub, v in value.items())
    else:
      out.append(((name,), value))
  return out


def _assemble(pairs: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  """The inverse of :func:`_entries`."""
  probes: dict[str, Any] = {}
  for key, value in pairs:
    if len(key) == 1:
      probes[key[0]] = value
    else:
      probes.setdefault(key[0], {})[key[1]] = value
  return probes


def _attach(module: nnx.Module, path: Path, layer: Layer, statistics, probes) -> list[str]:
  names = []
  for i, (key, value) in enumerate(_entries(probes)):
    name = f"{_PREFIX}{i}"
    setattr(module, name, _Probe(value, eva_probe=_Tag(path, layer, statistics, key)))
    names.append(name)
  return names


def _probes_of(module: nnx.Module) -> tuple[_Tag, dict[str, Any]] | None:
  """The tag and the probe dict of a module holding probes, else ``None``."""
  tags = [
    (v.get_metadata()["eva_probe"], v[...])
    for k, v in vars(module).items()
    if k.startswith(_PREFIX) and isinstance(v, _Probe)
  ]
  if not tags:
    return None
  return tags[0][0], _assemble([(tag.key, value) for tag, value in tags])


def _probe_grads(grads: nnx.State) -> dict[Path, dict[str, Any]]:
  """The probes' gradients per layer path, as the core's probe dicts."""
  pairs: dict[Path, list] = {}
  for _, var in nnx.to_flat_state(grads):
    tag = var.get_metadata()["eva_probe"]
    pairs.setdefault(tag.path, []).append((tag.key, var[...]))
  return {path: _assemble(p) for path, p in pairs.items()}


# ---------------------------------------------------------------------------
# The capturing classes: one subclass per layer class, set on probed instances.


_local = threading.local()
_subclasses: dict[type, type] = {}


def _capturing(cls: type) -> type:
  """The subclass of ``cls`` whose ``__call__`` runs through the core's probes."""
  sub = _subclasses.get(cls)
  if sub is not None:
    return sub
  original = cls.__call__

  def __call__(self, *args, **kwargs):
    found = _probes_of(self)
    if found is None:
      return original(self, *args, **kwargs)
    tag, probes = found
    called = getattr(_local, "called", None)
    if called is not None:
      called.add(tag.path)
    call = lambda *a, **k: original(self, *a, **k)
    return capture.probed_call(tag.layer, tag.statistics, probes, call, args, kwargs)

  namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
  return _subclasses.setdefault(cls, type(cls)(cls.__name__, (cls,), namespace))


@contextlib.contextmanager
def _probed(layers: dict[Path, tuple[nnx.Module, Layer]], statistics, due, axis_name):
  """The probes attached and the classes swapped for the duration of the block;
  yields the set of layer paths called inside it."""
  done: list[tuple[nnx.Module, type, list[str]]] = []
  outer = getattr(_local, "called", None)
  _local.called = set()
  try:
    for path, (module, layer) in layers.items():
      probes = capture.per_device(capture.zero_probes(layer, statistics, due), axis_name)
      cls = type(module)
      done.append((module, cls, _attach(module, path, layer, statistics, probes)))
      object.__setattr__(module, "__class__", _capturing(cls))
    yield _local.called
  finally:
    _local.called = outer
    for module, cls, names in done:
      object.__setattr__(module, "__class__", cls)
      for name in names:
        delattr(module, name)


# ---------------------------------------------------------------------------
# The gradient function.


def nnx_value_and_grad(
  loss_fn: Callable[..., Any],
  argnums: int = 0,
  has_aux: bool = False,
  *,
  statistics: Sequence[str] = EVA_STATISTICS,
  axis_name: Any = None,
  factor_rows: str = "positions",
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like :func:`flax.nnx.value_and_grad`, also returning per-layer statistics.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning the scalar loss (the
      mean over the batch), or ``(loss, aux)`` when ``has_aux``. ``model`` is
      an ``nnx.Module``; updates of its other variables (BatchNorm statistics,
      RNG counts) reach the model, as with :func:`flax.nnx.value_and_grad`.
    argnums: the position of the model among the positional arguments of
      ``loss_fn`` (an int, default 0), as for :func:`flax.nnx.value_and_grad`:
      with ``argnums=1``, ``loss_fn(batch, model)`` and ``grad_fn(batch,
      model)``. The ``nnx.Param`` variables of that model are differentiated.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    statistics: which statistics to capture, as for
      :func:`eva_optax.value_and_grad` (default ``('input_mean',
      'output_grad_mean')``, what Eva needs; ``eva_optax.KFAC_STATISTICS`` for
      K-FAC, …).
    axis_name: under ``pmap`` / ``shard_map``, the data-parallel axis name(s):
      the statistics become those of the global batch, as in
      :func:`eva_optax.value_and_grad`.
    factor_rows: what a row of A and G is, as in :func:`eva_optax.value_and_grad`.

  Returns:
    ``grad_fn(model, *args, factors_due=True, **kwargs) -> (value, grads, stats)``,
    ``model`` at position ``argnums``: ``value`` the loss (or ``(loss, aux)``),
    ``grads`` the ``nnx.State`` of the ``nnx.Param`` gradients (as
    ``nnx.value_and_grad(loss_fn)`` gives), ``stats`` a tree keyed by module path
    like ``nnx.state(model, nnx.Param)`` holding a :class:`~eva_optax.LayerStats`
    per ``Linear`` / ``LinearGeneral`` / ``Conv`` / ``Einsum`` called (``kind`` is
    the NNX class name) and a :class:`~eva_optax.PassThrough` per other module
    owning an ``nnx.Param`` ``kernel`` (``ConvTranspose``, Einsum equations with an
    ellipsis, ``LinearGeneral`` with ``batch_axis``, layers ``loss_fn`` did not
    call). ``factors_due`` gates the K-FAC factors, as for
    :func:`eva_optax.value_and_grad`. The first call warns once
    (:class:`eva_optax.PassThroughWarning`) of the modules owning a kernel that are
    passed through because of their kind or configuration.

  Example::

      grad_fn = eva_optax.nnx_value_and_grad(loss_fn)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

      @nnx.jit
      def train_step(model, optimizer, x, y):
        loss, grads, stats = grad_fn(model, x, y)
        optimizer.update(model, grads, stats=stats)
        return loss
  """
  statistics = requested(statistics)
  check_factor_rows(factor_rows)
  front_end = "eva_optax.nnx_value_and_grad"
  argnums = capture.check_argnums(argnums, front_end)
  warned: set = set()  # the sets of pass-through modules already warned of

  def wrapped(model, *args, **kwargs):
    out = loss_fn(*capture.put_back(model, args, argnums), **kwargs)
    return capture.loss_and_aux(out, has_aux)

  value_and_grad = nnx.value_and_grad(
    wrapped,
    argnums=nnx.DiffState(0, nnx.Any(nnx.Param, _Probe)),
    has_aux=True,
    graph=True,
    graph_updates=True,
  )

  def grad_fn(*args: Any, **kwargs: Any):
    model, args = capture.move_to_front(args, argnums, front_end)
    if not isinstance(model, nnx.Module):
      which = "its first argument" if argnums == 0 else f"the argument argnums={argnums}"
      linen = (
        " For Flax Linen, whose parameters are a dict, use"
        " eva_optax.value_and_grad(loss_fn) with loss_fn(params, ...)"
        if isinstance(model, Mapping)
        else ""
      )
      raise TypeError(
        f"eva_optax.nnx_value_and_grad differentiates {which}, which"
        f" must be an nnx.Module; got {type(model).__name__}.{linen}"
      )
    due = capture.factors_gate(kwargs.pop(FACTORS_DUE, True), statistics)
    layers, skipped = _find_layers(model)
    capture.warn_pass_through(skipped, warned, front_end)
    layers = {p: (m, l._replace(factor_rows=factor_rows)) for p, (m, l) in layers.items()}
    with _probed(layers, statistics, due, axis_name) as called:
      (loss, aux), grads = value_and_grad(model, *args, **kwargs)
      called = set(called)

    probe_state, grads = nnx.split_state(grads, _Probe, ...)
    probe_grads = {p: g for p, g in _probe_grads(probe_state).items() if p in called}
    layers = {p: layer for p, (_, layer) in layers.items()}
    value = (loss, aux) if has_aux else loss
    return value, grads, capture.stats_tree(probe_grads, layers, skipped, axis_name)

  return grad_fn


__all__ = ["nnx_value_and_grad"]
