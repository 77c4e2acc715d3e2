"""The taps: identities whose VJPs deliver the statistics of one call (:func:`probed_call`),
and the output probe term that gives ḡ as a bias-gradient-like reduction."""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp

from eva_optax._src.capture.geometry import EinsumGeometry, Layer
from eva_optax._src.capture.call_statistics import (
  batch_size,
  input_factor,
  input_mean,
  output_grad_factor,
  sample_count,
  varying_like,
)
from eva_optax._src.statistics import (
  INPUT_FACTOR,
  INPUT_MEAN,
  OUTPUT_GRAD_FACTOR,
  OUTPUT_GRAD_MEAN,
)


INPUT_PROBE = "eva_input_probe"
OUTPUT_PROBE = "eva_output_probe"
OUTPUT_FACTOR_PROBE = "eva_output_factor_probe"
PROBES = (INPUT_PROBE, OUTPUT_PROBE, OUTPUT_FACTOR_PROBE)
CALLS = "calls"
# The keyword of ``grad_fn`` that gates the factors, and the input-probe entry
# that carries the gate to every layer (sliced by scans like the other probes).
FACTORS_DUE = "factors_due"


def tap_input(x: jax.Array, probe: dict, statistics: Callable) -> jax.Array:
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
    return x, {
      k: varying_like(jnp.broadcast_to(values[k].astype(v.dtype), v.shape), v)
      for k, v in probe.items()
    }

  def bwd(values, cotangent):
    return cotangent, values

  tap.defvjp(fwd, bwd)
  return tap(x, probe)


def tap_output(
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
    gated = lambda ct, d: when_due(d, lambda: factor(ct).astype(dtype), probe)

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
      varying_like(gated(cotangent, due), probe),
      varying_like(jnp.zeros_like(due), due),
    )

  tap.defvjp(fwd, bwd)
  return tap(y, probe, due)


def when_due(due: jax.Array | None, compute: Callable[[], jax.Array], like: jax.Array):
  """``compute()`` if the gate is open (or absent), else zeros shaped like ``like``."""
  if due is None:
    return compute()
  zeros = lambda: varying_like(jnp.zeros(like.shape, like.dtype), like)
  return jax.lax.cond(jnp.any(due > 0), lambda: varying_like(compute(), like), zeros)


def inputs_of(args: tuple, kwargs: dict) -> tuple[Any, Callable[[Any], tuple]]:
  """The layer input (first positional argument, or ``inputs=``) and a
  function putting a replacement back in place."""
  if args:
    return args[0], lambda x: ((x,) + tuple(args[1:]), kwargs)
  x = kwargs["inputs"]
  return x, lambda x: (args, {**kwargs, "inputs": x})


def output_probe_term(layer: Layer, probe: jax.Array, y: jax.Array) -> jax.Array:
  """p / n shaped to broadcast against ``y``: ∂L/∂p is then the mean of ∂L/∂y
  over the n output positions (``probe``: ``[stack +] (out,)`` of this call)."""
  if not isinstance(layer.geometry, EinsumGeometry):
    features = y.shape[y.ndim - layer.layout.output_ndim :]
    return (probe / (y.size // max(math.prod(features), 1))).reshape(features)
  g = layer.geometry
  kept = g.stack + g.outputs  # the probe's axes
  sizes = [y.shape[g.output.index(c)] for c in kept]
  in_output_order = "".join(c for c in g.output if c in kept)
  term = jnp.einsum(f"{kept}->{in_output_order}", probe.reshape(sizes))
  shape = [y.shape[i] if c in kept else 1 for i, c in enumerate(g.output)]
  return term.reshape(shape) / (y.size // max(math.prod(sizes), 1))


def probed_call(
  layer: Layer,
  statistics: tuple[str, ...],
  probes: dict[str, Any],
  call: Callable[..., jax.Array],
  args: tuple,
  kwargs: dict,
) -> jax.Array:
  """One call of a captured layer with its probes: ``call(*args, **kwargs)``.

  The input goes through :func:`tap_input` (ā, A), the output gets the
  additive ḡ probe and :func:`tap_output` (G). ``probes`` holds this call's
  probe values by name (:func:`zero_probes`, sliced by any transform).
  """
  x, put_back = inputs_of(args, kwargs)
  input_probe = probes[INPUT_PROBE]

  def input_statistics(x, due):
    values = {CALLS: jnp.ones([], jnp.float32)}
    if INPUT_MEAN in statistics:
      values[INPUT_MEAN] = input_mean(layer.geometry, x, layer.dtype)
    if INPUT_FACTOR in statistics:
      values[INPUT_FACTOR] = when_due(
        due, lambda: input_factor(layer, x), input_probe[INPUT_FACTOR]
      )
    return values

  x = tap_input(x, input_probe, input_statistics)
  per_sample = layer.factor_rows == "samples"
  batch = (sample_count if per_sample else batch_size)(layer.geometry, x)
  args, kwargs = put_back(x)
  y = call(*args, **kwargs)
  if OUTPUT_GRAD_MEAN in statistics:
    y = y + output_probe_term(layer, probes[OUTPUT_PROBE], y).astype(y.dtype)
  if OUTPUT_GRAD_FACTOR in statistics:
    y = tap_output(
      y,
      probes[OUTPUT_FACTOR_PROBE],
      lambda ct: output_grad_factor(
        ct, layer.out_dim, batch, layer.dtype, layer.geometry, per_sample
      ),
      input_probe.get(FACTORS_DUE),
    )
  return y
