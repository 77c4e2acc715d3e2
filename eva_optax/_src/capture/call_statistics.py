"""The statistics of one layer call, from its input and its output gradient: ā (the row
mean, or for a convolution the mean of the im2col patches of the batch-mean image), and
K-FAC's factors A and G."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eva_optax._src.capture.geometry import (
  ConvGeometry,
  DenseGeometry,
  EinsumGeometry,
  Geometry,
  Layer,
)


_HIGHEST = jax.lax.Precision.HIGHEST


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
