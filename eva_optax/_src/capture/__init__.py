"""The capture's core: per-call statistics through zero probes, for any front-end.

One concern a module: :mod:`.geometry` (the layer record), :mod:`.call_statistics` (the
statistics of one call), :mod:`.taps` (the identities whose VJPs deliver them),
:mod:`.probes` (probes in, the stats tree out; the multi-device average) and
:mod:`.front_end` (what the front-ends share around the call).

The Linen capture (:mod:`eva_optax._src.linen_capture`) and the NNX capture
(:mod:`eva_optax._src.nnx_capture`) find the layers of a model in their own
way and describe each one by a :class:`Layer` record (its layout and its
geometry); everything that happens to a layer call from then on is written
here once, in JAX alone:

* ā (``input_mean``): mean of the layer input over every axis but the
  contracted ones (dense layers); for convolutions, the input is averaged over
  the batch first, then the im2col patches of that mean image (the layer's own
  padding, strides and dilations) are averaged over the output positions, in
  the order of the kernel flattened to ``(in, out)`` — the authors' convention.
* ḡ (``output_grad_mean``): mean over batch and positions of ∂L/∂y, with L the
  user's loss (a mean over the batch, so ḡ carries the 1/batch factor).
* A and G (``input_factor``, ``output_grad_factor``): K-FAC's factors, when
  asked for, optionally gated by a traced bool (:data:`FACTORS_DUE`).

How: each layer gets zero "probes" next to its kernel (:func:`zero_probes`),
differentiated with the parameters, so that lifted transforms (scan, remat,
vmap) slice and carry them like parameters; :func:`probed_call` runs one call
of the layer with them:

* the output probe p (shape ``(out,)``) is added to the output, y + p / n with
  n the number of output positions of the call; ∂L/∂p is then the mean of ∂L/∂y
  — a bias-gradient-like reduction, never a copy of the activations;
* the input probe q enters through an identity with a custom VJP whose
  cotangent for q is ``{calls: 1, input_mean: ā of this call, ...}``.

The probes are zero and change no value. A layer called several times
accumulates one contribution per call in each probe, and ``calls`` counts them,
so :func:`~eva_optax._src.capture.probes.layer_stats` averages the statistics over the calls.

The package exports what the front-ends use; the rest is reached through its module.

References:
  Zhang, Shi, Li. Eva: Practical Second-order Optimization with
  Kronecker-vectorized Approximation. ICLR 2023.
"""

from __future__ import annotations

from eva_optax._src.capture.geometry import (
  ConvGeometry,
  DenseGeometry,
  Layer,
  canonical_padding,
  einsum_geometry,
  layer_record,
  per_axis,
)
from eva_optax._src.capture.taps import (
  FACTORS_DUE,
  INPUT_PROBE,
  PROBES,
  probed_call,
)
from eva_optax._src.capture.probes import (
  factors_gate,
  loss_and_aux,
  per_device,
  stats_tree,
  zero_probes,
)
from eva_optax._src.capture.front_end import (
  PassThroughWarning,
  check_argnums,
  move_to_front,
  put_back,
  warn_pass_through,
)

__all__ = [
  "ConvGeometry",
  "DenseGeometry",
  "FACTORS_DUE",
  "INPUT_PROBE",
  "Layer",
  "PROBES",
  "PassThroughWarning",
  "canonical_padding",
  "check_argnums",
  "einsum_geometry",
  "factors_gate",
  "layer_record",
  "loss_and_aux",
  "move_to_front",
  "per_axis",
  "per_device",
  "probed_call",
  "put_back",
  "stats_tree",
  "warn_pass_through",
  "zero_probes",
]
