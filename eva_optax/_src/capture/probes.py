"""Probes in, statistics out: the zero probes of a layer, its statistics from their
gradients, the average over a data-parallel axis, the factor gate, and the stats tree a
``grad_fn`` returns."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from eva_optax._src.capture.geometry import Layer
from eva_optax._src.paths import nest
from eva_optax._src.capture.taps import (
  CALLS,
  FACTORS_DUE,
  INPUT_PROBE,
  OUTPUT_FACTOR_PROBE,
  OUTPUT_PROBE,
)
from eva_optax._src.statistics import (
  FACTORS,
  INPUT_FACTOR,
  INPUT_MEAN,
  OUTPUT_GRAD_FACTOR,
  OUTPUT_GRAD_MEAN,
  LayerStats,
  PassThrough,
  statistic_shapes,
)


def zero_probes(layer: Layer, statistics: tuple[str, ...], due: jax.Array | None) -> dict[str, Any]:
  """Zero probes of one layer for the requested statistics (and the factors' gate)."""
  shapes = statistic_shapes(layer.stack_shape, layer.in_dim, layer.out_dim, layer.has_bias)
  zeros = lambda name: jnp.zeros(shapes[name], layer.dtype)
  inputs = {CALLS: jnp.zeros(layer.stack_shape, jnp.float32)}
  if due is not None:
    inputs[FACTORS_DUE] = jnp.broadcast_to(due.astype(jnp.float32), layer.stack_shape)
  for name in (INPUT_MEAN, INPUT_FACTOR):
    if name in statistics:
      inputs[name] = zeros(name)
  probes = {INPUT_PROBE: inputs}
  if OUTPUT_GRAD_MEAN in statistics:
    probes[OUTPUT_PROBE] = zeros(OUTPUT_GRAD_MEAN)
  if OUTPUT_GRAD_FACTOR in statistics:
    probes[OUTPUT_FACTOR_PROBE] = zeros(OUTPUT_GRAD_FACTOR)
  return probes


def layer_stats(layer: Layer, probe_grads: dict[str, Any]) -> LayerStats:
  """The statistics of one layer from its probes' gradients, averaged over calls."""
  inputs = probe_grads[INPUT_PROBE]
  calls = jnp.maximum(inputs[CALLS], 1.0)
  per_call = lambda v, n: None if v is None else v / calls.reshape(calls.shape + (1,) * n)
  return LayerStats(
    input_mean=per_call(inputs.get(INPUT_MEAN), 1),
    output_grad_mean=per_call(probe_grads.get(OUTPUT_PROBE), 1),
    input_factor=per_call(inputs.get(INPUT_FACTOR), 2),
    output_grad_factor=per_call(probe_grads.get(OUTPUT_FACTOR_PROBE), 2),
    kind=layer.kind,
    layout=layer.layout,
    has_bias=layer.has_bias,
    factor_rows=layer.factor_rows,
  )


def per_device(probes: Any, axis_name: Any) -> Any:
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


def global_statistics(
  probe_grads: dict, axis_name: Any, layers: dict[Any, Layer] | None = None
) -> dict:
  """The probes' gradients of the global batch from those of each device's shard.

  Every statistic is a mean over the samples, averaged over the devices
  (``pmean``), except ḡ: it is the mean of ∂L/∂y for L the mean loss of the
  batch, so it carries a factor 1/batch, and the global batch is ``size``
  times a shard: ḡ = pmean(ḡ_shard) / size. (G = N·Σ_rows … already is a
  per-sample mean; a ``'samples'`` G of the layers in ``layers`` carries
  1/batch², hence / size².) Unchanged without an axis.
  """
  if axis_name is None:
    return probe_grads
  size = jax.lax.psum(1, axis_name)
  averaged = jax.lax.pmean(probe_grads, axis_name)

  def scale(path, name):
    if name == OUTPUT_PROBE:
      return size
    samples = layers is not None and layers[path].factor_rows == "samples"
    return size * size if name == OUTPUT_FACTOR_PROBE and samples else 1

  out = {}
  for path, layer in averaged.items():
    out[path] = {}
    for name, value in layer.items():
      by = scale(path, name)
      out[path][name] = value if by == 1 else value / by
  return out


def stats_tree(
  probe_grads: dict,
  layers: dict[Any, Layer],
  passed_through: dict[Any, PassThrough],
  axis_name: Any = None,
) -> Any:
  """The stats tree a ``grad_fn`` returns, keyed like the parameters: each layer's
  :class:`LayerStats` from its probes' gradients (of the global batch under
  ``axis_name``, :func:`global_statistics`), each module of ``passed_through`` as its
  :class:`PassThrough`, and a layer without probe gradients (the loss never called
  it) as a :class:`PassThrough` saying so."""
  probe_grads = global_statistics(probe_grads, axis_name, layers)
  entries: dict[Any, Any] = dict(passed_through)
  for path, layer in layers.items():
    if path in probe_grads:
      entries[path] = layer_stats(layer, probe_grads[path])
    else:
      entries[path] = PassThrough(
        layer.kind,
        f"not called by loss_fn through {layer.kind}.__call__ (no statistics):"
        " its parameters get the plain gradient",
      )
  return nest(entries)


def factors_gate(factors_due: Any, statistics: tuple[str, ...]) -> jax.Array | None:
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


def loss_and_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
  """``(loss, aux)`` of the user's ``loss_fn`` output (``aux`` ``None`` without one)."""
  if not has_aux:
    return out, None
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise TypeError("has_aux=True needs loss_fn to return (loss, aux)")
  return out[0], out[1]
