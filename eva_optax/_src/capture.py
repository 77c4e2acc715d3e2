"""The capture's core: per-call statistics through zero probes, for any front-end.

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
so :func:`layer_stats` averages the statistics over the calls.

References:
  Zhang, Shi, Li. Eva: Practical Second-order Optimization with
  Kronecker-vectorized Approximation. ICLR 2023.
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from eva_optax._src.statistics import (
  FACTORS,
  INPUT_FACTOR,
  INPUT_MEAN,
  OUTPUT_GRAD_FACTOR,
  OUTPUT_GRAD_MEAN,
  KernelLayout,
  LayerStats,
  PassThrough,
  statistic_dtype,
  statistic_shapes,
)

INPUT_PROBE = "eva_input_probe"
OUTPUT_PROBE = "eva_output_probe"
OUTPUT_FACTOR_PROBE = "eva_output_factor_probe"
PROBES = (INPUT_PROBE, OUTPUT_PROBE, OUTPUT_FACTOR_PROBE)
CALLS = "calls"
# The keyword of ``grad_fn`` that gates the factors, and the input-probe entry
# that carries the gate to every layer (sliced by scans like the other probes).
FACTORS_DUE = "factors_due"

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# The layer record.


class DenseGeometry(NamedTuple):
  """A dense layer y = x·W (+ b) contracting the input axes ``axis``.

  ``axis``: the contracted input axes, negative or not (Dense: ``(-1,)``);
  as in Flax, the kernel's input axes follow them in increasing order.
  """

  axis: tuple[int, ...] = (-1,)


class ConvGeometry(NamedTuple):
  """A convolution with a kernel of shape ``kernel_size + (in, out)`` (HWIO).

  Every field is one int per spatial axis, except ``padding``: ``'SAME'``,
  ``'VALID'``, ``'CAUSAL'``, ``'CIRCULAR'``, ``'REFLECT'``, or a
  ``(low, high)`` pair per spatial axis — Flax's conventions. With
  ``groups`` > 1 the input channels and the outputs split into that many
  contiguous groups, group g mapping its channels to its outputs (the kernel's
  ``in`` is then channels/groups).
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int = 1  # feature_group_count: each group of channels its own layer


class EinsumGeometry(NamedTuple):
  """y = einsum(``'{inputs},{kernel}->{output}'``, x, kernel) (+ bias).

  Each kernel label is a contracted input axis (in ``inputs``, not in
  ``output``), an output axis (in ``output`` only) or a stack axis (in all
  three: one independent layer per index). :func:`einsum_geometry` builds it
  from an equation, or says why an equation is not supported.
  """

  inputs: str
  kernel: str
  output: str

  @property
  def stack(self) -> str:
    return "".join(c for c in self.kernel if c in self.inputs and c in self.output)

  @property
  def contracted(self) -> str:
    return "".join(c for c in self.kernel if c in self.inputs and c not in self.output)

  @property
  def outputs(self) -> str:
    return "".join(c for c in self.kernel if c not in self.inputs)

  def permutation(self) -> tuple[int, ...]:
    """The kernel's axes as ``stack + contracted + outputs``."""
    return tuple(self.kernel.index(c) for c in self.stack + self.contracted + self.outputs)

  def bias_axes(self) -> tuple[int, ...]:
    """The kernel axes of a bias, in the output's order (how Flax adds it)."""
    return tuple(self.kernel.index(c) for c in self.output if c in self.kernel)


Geometry = DenseGeometry | ConvGeometry | EinsumGeometry


def einsum_geometry(equation: str) -> EinsumGeometry | str:
  """The :class:`EinsumGeometry` of ``'x,kernel->y'``, or why it is not a layer
  the statistics describe (the reason, a string)."""
  equation = equation.replace(" ", "")
  if "..." in equation:
    return f"Einsum {equation!r} has an ellipsis: its axes cannot be named before the call"
  if equation.count("->") != 1 or equation.split("->")[0].count(",") != 1:
    return f"Einsum {equation!r} is not of the form 'x,kernel->y'"
  operands, output = equation.split("->")
  inputs, kernel = operands.split(",")
  for name, labels in (("input", inputs), ("kernel", kernel), ("output", output)):
    if len(set(labels)) != len(labels):
      return f"Einsum {equation!r} repeats a label of the {name} (a diagonal)"
  geometry = EinsumGeometry(inputs, kernel, output)
  if any(c not in inputs and c not in output for c in kernel):
    return f"Einsum {equation!r} sums a kernel axis that neither input nor output has"
  if any(c not in kernel and c not in output for c in inputs):
    return f"Einsum {equation!r} sums an input axis the kernel does not contract"
  if not geometry.contracted or not geometry.outputs:
    return f"Einsum {equation!r} needs a contracted axis and an output axis in the kernel"
  return geometry


class Layer(NamedTuple):
  """One captured layer (static): what the front-end learned, what the core needs.

  Attributes:
    kind: the layer's name in the stats (``'Dense'``, ``'Linear'``, ``'Conv'`` …).
    geometry: how the layer maps its input (:class:`DenseGeometry`,
      :class:`ConvGeometry`, :class:`EinsumGeometry`).
    layout: the :class:`~eva_optax.KernelLayout` of its (possibly stacked) kernel.
    stack_shape: the leading stacked-layer axes of the kernel.
    in_dim: the contracted size (the product of the input axes).
    out_dim: the feature size (the product of the output axes).
    has_bias: whether the layer has a bias.
    dtype: the statistics' dtype (:func:`~eva_optax._src.statistics.statistic_dtype`).
    factor_rows: what a row of the factors A and G is (:data:`FACTOR_ROWS`):
      ``'positions'``, every position of every sample; ``'samples'``, one row
      per sample, the mean over its positions.
  """

  kind: str
  geometry: Geometry
  layout: KernelLayout
  stack_shape: tuple[int, ...]
  in_dim: int
  out_dim: int
  has_bias: bool
  dtype: str = "float32"
  factor_rows: str = "positions"


def layer_record(
  kind: str,
  geometry: Geometry,
  kernel_shape: tuple[int, ...],
  kernel_ndim: int,
  output_ndim: int,
  has_bias: bool,
  kernel_dtype: Any = jnp.float32,
) -> Layer:
  """The :class:`Layer` of a kernel of shape ``kernel_shape``, whose unstacked
  rank is ``kernel_ndim`` (the leading extra axes are a stack of layers); its
  statistics are kept in :func:`~eva_optax._src.statistics.statistic_dtype`
  of the kernel's dtype."""
  scan = len(kernel_shape) - kernel_ndim
  if isinstance(geometry, EinsumGeometry):
    # Stacked layers (scan) first, then the equation's own stack axes.
    perm = tuple(range(scan)) + tuple(scan + a for a in geometry.permutation())
    bias_axes = tuple(range(scan)) + tuple(scan + a for a in geometry.bias_axes())
    layout = KernelLayout(
      scan + len(geometry.stack),
      len(geometry.outputs),
      None if perm == tuple(range(len(perm))) else perm,
      None if perm == tuple(range(len(perm))) else bias_axes,
    )
  elif isinstance(geometry, ConvGeometry) and geometry.groups > 1:
    layout = KernelLayout(scan + 1, 1, groups=geometry.groups)
  else:
    layout = KernelLayout(scan, output_ndim)
  stack, in_dim, out_dim = layout.dims(tuple(kernel_shape))
  dtype = jnp.dtype(statistic_dtype(kernel_dtype)).name
  return Layer(kind, geometry, layout, stack, in_dim, out_dim, has_bias, dtype)


def canonical_padding(padding: Any, rank: int) -> str | tuple[tuple[int, int], ...]:
  """Flax's padding argument (a string, an int, ints or pairs per axis) as
  a string or a ``(low, high)`` pair per spatial axis."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != rank or any(len(p) != 2 for p in pads):
    raise ValueError(f"invalid convolution padding {padding!r} for {rank} spatial axes")
  return pads


def per_axis(value: Any, rank: int) -> tuple[int, ...]:
  """A stride or dilation (``None``, an int or one int per axis) as one int per axis."""
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


# ---------------------------------------------------------------------------
# Statistics of one call.


def _images(geometry: ConvGeometry, x: jax.Array, dtype: Any) -> jax.Array:
  """The conv input as ``(images,) + spatial + (channels,)``, in ``dtype``."""
  spatial = x.shape[x.ndim - len(geometry.kernel_size) - 1 :]
  return x.reshape((-1,) + spatial).astype(dtype)


def convolve(geometry: ConvGeometry, images: jax.Array, kernel: jax.Array) -> jax.Array:
  """The layer's convolution of ``images`` (NHWC) with an HWIO ``kernel``.

  Padding as Flax pads: CIRCULAR and REFLECT wrap or mirror the input by the
  SAME amounts ((k−1)//2 low, k//2 high for the dilated window k), CAUSAL
  zero-pads k−1 on the low side of the one spatial axis, then a VALID
  convolution; the other paddings go to ``lax.conv_general_dilated``.
  """
  n = len(geometry.kernel_size)
  padding = geometry.padding
  if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
    window = [(k - 1) * d + 1 for k, d in zip(geometry.kernel_size, geometry.kernel_dilation)]
    if padding == "CAUSAL":
      pads, mode = [(window[0] - 1, 0)], "constant"
    else:
      pads = [((w - 1) // 2, w // 2) for w in window]
      mode = "wrap" if padding == "CIRCULAR" else "reflect"
    images = jnp.pad(images, [(0, 0)] + pads + [(0, 0)], mode=mode)
    padding = "VALID"
  spec = (0, n + 1) + tuple(range(1, n + 1))
  numbers = jax.lax.ConvDimensionNumbers(spec, (n + 1, n) + tuple(range(n)), spec)
  return jax.lax.conv_general_dilated(
    images,
    kernel,
    geometry.strides,
    padding if isinstance(padding, str) else list(padding),
    lhs_dilation=geometry.input_dilation,
    rhs_dilation=geometry.kernel_dilation,
    dimension_numbers=numbers,
    precision=_HIGHEST,
  )


def _by_group(geometry: ConvGeometry, patches: jax.Array) -> jax.Array:
  """Patches ``(..., window · channels)`` in HWIO order as ``(groups, ...,
  window · channels/groups)``: the patches each group of channels sees."""
  if geometry.groups == 1:
    return patches
  window = math.prod(geometry.kernel_size)
  lead = patches.shape[:-1]
  split = patches.reshape(lead + (window, geometry.groups, -1))
  return jnp.moveaxis(split, -2, 0).reshape((geometry.groups,) + lead + (-1,))


def input_rows(geometry: Geometry, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """The layer input as rows ``[stack +] (positions, in)`` in the kernel's input order.

  Dense: every non-contracted position is a row. Conv: the im2col patches of
  the input, obtained by the layer's own convolution with an identity kernel
  (per group of channels in front for a grouped conv). Einsum: the equation's
  stack axes in front, every other non-contracted axis a row. In ``dtype``
  (the statistics' precision).
  """
  if isinstance(geometry, EinsumGeometry):
    return _einsum_rows(geometry, x, geometry.inputs, geometry.contracted, dtype)
  if isinstance(geometry, DenseGeometry):
    axis = tuple(sorted(a % x.ndim for a in geometry.axis))  # Flax's kernel order
    moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    in_dim = math.prod(x.shape[a] for a in axis)
    return moved.reshape(-1, in_dim).astype(dtype)
  images = _images(geometry, x, dtype)
  channels = images.shape[-1]
  in_dim = math.prod(geometry.kernel_size) * channels
  identity = jnp.eye(in_dim, dtype=dtype).reshape(geometry.kernel_size + (channels, in_dim))
  return _by_group(geometry, convolve(geometry, images, identity).reshape(-1, in_dim))


def _einsum_rows(
  geometry: EinsumGeometry, z: jax.Array, labels: str, features: str, dtype: Any
) -> jax.Array:
  """``z`` (axes ``labels``) as ``stack + (rows, features)``: the equation's
  stack axes first, every other axis a row (the sample axis, the input's first
  row axis, leading), the ``features`` axes last."""
  stack = geometry.stack
  rows = "".join(c for c in labels if c not in stack and c not in features)
  sample = _einsum_sample_label(geometry)
  if sample in rows:
    rows = sample + rows.replace(sample, "")
  order = [labels.index(c) for c in stack + rows + features]
  moved = jnp.transpose(z, order).astype(dtype)
  sizes = [z.shape[labels.index(c)] for c in stack]
  return moved.reshape(tuple(sizes) + (-1, math.prod(z.shape[labels.index(c)] for c in features)))


def input_mean(geometry: Geometry, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """ā of one call (without the bias 1), in ``dtype``.

  Dense: the mean of the rows. Conv: batch mean first, then the mean of its
  im2col patches, in HWIO order. With zero padding (SAME, VALID, CAUSAL,
  explicit pads) that patch mean is one matrix product with a constant
  selection matrix (:func:`patch_selection`). Otherwise (CIRCULAR, REFLECT,
  input dilation) it is the gradient, w.r.t. a one-output kernel, of the mean
  over positions of the layer's own convolution of the mean image:
  convolution is linear in the kernel.
  """
  if isinstance(geometry, (DenseGeometry, EinsumGeometry)):
    return jnp.mean(input_rows(geometry, x, dtype), axis=-2)
  images = _images(geometry, x, dtype)
  mean_image = jnp.mean(images, axis=0)
  selection = patch_selection(geometry, mean_image.shape[:-1])
  if selection is not None:
    # ā = M · vec(mean image): one product, M constant (built at trace time).
    flat = mean_image.reshape(-1, mean_image.shape[-1])
    return _by_group(
      geometry, jnp.dot(jnp.asarray(selection, dtype), flat, precision=_HIGHEST).reshape(-1)
    )
  mean_image = mean_image[None]
  # Per device under shard_map (else its gradient would be summed over devices).
  kernel = varying_like(
    jnp.zeros(geometry.kernel_size + (mean_image.shape[-1], 1), dtype), mean_image
  )
  out, vjp = jax.vjp(lambda k: convolve(geometry, mean_image, k), kernel)
  (patch_mean,) = vjp(varying_like(jnp.full(out.shape, 1.0 / out.size, out.dtype), out))
  return _by_group(geometry, patch_mean.reshape(-1))


def patch_selection(geometry: ConvGeometry, spatial: tuple[int, ...]) -> np.ndarray | None:
  """The matrix M with ā = M · vec(mean image), for zero-padded convolutions.

  Entry ``(window offset, pixel)`` of M counts the output positions that read
  that pixel at that offset of the window (divided by the number of output
  positions): one row per offset of the kernel window (in HWIO order), one
  column per input pixel. ``None`` where the padding is not zeros (CIRCULAR,
  REFLECT), with input dilation, or where M would be large (more than 2²⁰
  entries): :func:`input_mean` then differentiates the convolution instead.
  """
  kernel_size, strides, dilation = (
    geometry.kernel_size,
    geometry.strides,
    geometry.kernel_dilation,
  )
  if geometry.input_dilation != (1,) * len(kernel_size):
    return None
  if math.prod(kernel_size) * math.prod(spatial) > 2**20:
    return None
  padding = geometry.padding
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  if padding == "CAUSAL":
    pads = [(dilated[0] - 1, 0)]
  elif padding in ("CIRCULAR", "REFLECT"):
    return None
  elif isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(spatial, dilated, strides, padding)
  else:
    pads = list(padding)
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
  return selection


def _einsum_sample_label(geometry: EinsumGeometry) -> str:
  """The input's sample axis: its first axis that is neither stacked nor contracted."""
  for c in geometry.inputs:
    if c not in geometry.stack and c not in geometry.contracted:
      return c
  return ""


def sample_count(geometry: Geometry, x: jax.Array) -> int:
  """Number of samples of a call (the rows of a ``'samples'`` factor)."""
  if isinstance(geometry, EinsumGeometry):
    label = _einsum_sample_label(geometry)
    return x.shape[geometry.inputs.index(label)] if label else 1
  return batch_size(geometry, x)


def sample_means(rows: jax.Array, samples: int) -> jax.Array:
  """``[stack +] (samples·positions, d)`` rows, sample-major, as the mean over
  each sample's positions: ``[stack +] (samples, d)``."""
  lead = rows.shape[:-2]
  return jnp.mean(rows.reshape(lead + (samples, -1, rows.shape[-1])), axis=-2)


def input_factor(layer: Layer, x: jax.Array) -> jax.Array:
  """A = mean over rows of â âᵀ, with â = [row, 1] when the layer has a bias
  (one row per sample, its mean over positions, with ``factor_rows='samples'``)."""
  rows = input_rows(layer.geometry, x, layer.dtype)  # [stack +] (rows, in)
  if layer.factor_rows == "samples":
    rows = sample_means(rows, sample_count(layer.geometry, x))
  if layer.has_bias:
    rows = jnp.concatenate([rows, jnp.ones(rows.shape[:-1] + (1,), rows.dtype)], axis=-1)
  return jnp.einsum("...ri,...rj->...ij", rows, rows, precision=_HIGHEST) / rows.shape[-2]


def batch_size(geometry: Geometry, x: jax.Array) -> int:
  """Number of samples of a call: the leading axis (Dense), the batch axes (Conv)."""
  if isinstance(geometry, ConvGeometry):
    return math.prod(x.shape[: x.ndim - len(geometry.kernel_size) - 1])
  return x.shape[0] if x.ndim > 1 else 1


def output_grad_factor(
  cotangent: jax.Array,
  out_dim: int,
  batch: int,
  dtype: Any = jnp.float32,
  geometry: Geometry | None = None,
  per_sample: bool = False,
) -> jax.Array:
  """G = N · Σ_rows (∂L/∂y)(∂L/∂y)ᵀ, with N samples and L the mean loss.

  For a loss that is a mean over N samples, N · ∂L/∂y is the per-sample
  gradient, so for one row per sample G = E[g gᵀ]; positions (sequence, conv
  output pixels) are summed within a sample, as in KFC (Grosse & Martens 2016).
  With ``per_sample`` (``factor_rows='samples'``, the authors' K-FAC):
  G = (1/N) Σ_n ḡ_n ḡ_nᵀ with ḡ_n the mean over sample n's positions of
  ∂L/∂y — the gradient of the mean loss, so N² times smaller for one row per
  sample.
  """
  if isinstance(geometry, EinsumGeometry):
    rows = _einsum_rows(geometry, cotangent, geometry.output, geometry.outputs, dtype)
  elif isinstance(geometry, ConvGeometry) and geometry.groups > 1:
    rows = cotangent.reshape(-1, geometry.groups, out_dim).astype(dtype)
    rows = jnp.moveaxis(rows, 1, 0)
  else:
    rows = cotangent.reshape(-1, out_dim).astype(dtype)
  if per_sample:
    rows = sample_means(rows, batch)
    return jnp.einsum("...ro,...rp->...op", rows, rows, precision=_HIGHEST) / batch
  return batch * jnp.einsum("...ro,...rp->...op", rows, rows, precision=_HIGHEST)


# ---------------------------------------------------------------------------
# The taps: identities whose VJPs deliver the statistics.


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


def varying_like(value: jax.Array, ref: jax.Array) -> jax.Array:
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


# ---------------------------------------------------------------------------
# Probes in, statistics out.


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


# ---------------------------------------------------------------------------
# What the front-ends share around the call: argnums, the pass-through warning.


def check_argnums(argnums: Any, front_end: str) -> int:
  """``argnums`` as a non-negative int: the position of the differentiated argument."""
  if isinstance(argnums, bool):  # has_aux given where argnums now stands
    raise TypeError(
      f"{front_end}: argnums={argnums!r} is a bool; the signature is"
      f" {front_end}(loss_fn, argnums=0, has_aux=False, ...), as for"
      " jax.value_and_grad: pass has_aux by name"
    )
  try:
    index = operator.index(argnums)
  except TypeError:
    index = -1
  if index < 0:
    raise TypeError(
      f"{front_end}: argnums must be a non-negative int, the position of the"
      f" argument holding the parameters; got {argnums!r}. Other arguments are"
      " not differentiated: close over them, or differentiate them with"
      " jax.grad around the loss"
    )
  return index


def move_to_front(args: tuple, argnums: int, front_end: str) -> tuple[Any, tuple]:
  """``(args[argnums], the other args)``, checking that there are enough."""
  if len(args) <= argnums:
    raise TypeError(
      f"{front_end} differentiates the positional argument argnums={argnums}, but"
      f" grad_fn got {len(args)} positional argument(s)"
    )
  return args[argnums], args[:argnums] + args[argnums + 1 :]


def put_back(first: Any, rest: tuple, argnums: int) -> tuple:
  """The inverse of :func:`move_to_front`: the arguments in the user's order."""
  return rest[:argnums] + (first,) + rest[argnums:]


class PassThroughWarning(UserWarning):
  """Kernels of modules the capture cannot precondition get the plain gradient.

  Issued once per gradient function and set of such modules, at trace time.
  Silence it with
  ``warnings.filterwarnings('ignore', category=eva_optax.PassThroughWarning)``.
  """


# Frames of these packages are skipped for the line a warning names (under
# jit, the user's call of grad_fn is below JAX's tracing machinery).
_LIBRARY_MODULES = ("eva_optax", "jax", "jaxlib", "flax", "optax", "contextlib", "functools")


def _user_stacklevel() -> int:
  """The ``stacklevel`` of the first frame, above the caller of ``warnings.warn``,
  outside the library, JAX and Flax."""
  frame, level = sys._getframe(2), 2  # the caller of the function that warns
  while frame is not None:
    name = frame.f_globals.get("__name__", "")
    if not any(name == m or name.startswith(m + ".") for m in _LIBRARY_MODULES):
      return level
    frame, level = frame.f_back, level + 1
  return 2


def warn_pass_through(skipped: dict[Any, PassThrough], warned: set, front_end: str) -> None:
  """Warn (:class:`PassThroughWarning`) of the modules in ``skipped``, unless
  this set of modules was already warned of (``warned``, kept by the caller)."""
  if not skipped:
    return
  key = frozenset((tuple(path), entry.kind) for path, entry in skipped.items())
  if key in warned:
    return
  warned.add(key)
  names = ", ".join(
    f"{'/'.join(path) or 'the model itself'} ({entry.kind})"
    for path, entry in sorted(skipped.items(), key=lambda kv: kv[0])
  )
  one = len(skipped) == 1
  warnings.warn(
    f"{front_end}: {len(skipped)} module{'' if one else 's'} owning a kernel"
    f" cannot be preconditioned and {'is' if one else 'are'} passed through:"
    f" {names}. {'Its' if one else 'Their'} parameters get the plain gradient,"
    " a step at the plain learning rate, while the preconditioned layers move at"
    " about learning_rate / damping under Eva. eva_optax.describe(params, stats)"
    " gives the full account: every parameter, its rule, and why each module is"
    " passed through. Silence this with warnings.filterwarnings('ignore',"
    " category=eva_optax.PassThroughWarning).",
    PassThroughWarning,
    stacklevel=_user_stacklevel(),
  )
