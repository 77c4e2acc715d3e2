"""K-FAC: Kronecker-factored curvature with matrix factors (a baseline for Eva).

A layer's Fisher block is approximated by A ⊗ G with A = E[â âᵀ] (layer inputs,
â = [a, 1] with a bias) and G = E[g gᵀ] (per-sample gradients w.r.t. the layer
output). With π-adjusted damping (Martens & Grosse 2015, §6.3)

    π = sqrt((tr A / dim A) / (tr G / dim G)),
    V = (G + √γ/π · I)⁻¹ Ĝ (A + √γ·π · I)⁻¹,

then the KL clip across layers as in Eva. The factors are running averages
(updated every ``stats_every`` steps) and their damped inverses (Cholesky) are
recomputed every ``inverse_every`` steps (10 in the paper's CIFAR runs), inside
one compiled step through ``lax.cond``. Each damping is at least 1e-6 · tr/dim
of its factor (:func:`eva_optax.linalg.damped_inverse`): below that the damped
factor is singular in float32; this only matters when the two factors' scales
are ~10¹² apart.

Conventions of the capture (:func:`eva_optax.value_and_grad` with
``statistics=eva_optax.KFAC_STATISTICS``): rows are every position of every
sample (batch × sequence for Dense, batch × output pixels for Conv, the im2col
patches of the actual input); A is the mean over rows of â âᵀ and
G = N · Σ_rows (∂L/∂y)(∂L/∂y)ᵀ for a loss that is a mean over N samples. For one
row per sample this is the usual E[â âᵀ] ⊗ E[g gᵀ]; for convolutions it equals
KFC's Ω ⊗ Γ (Grosse & Martens 2016), positions summed within a sample. The
authors' PyTorch K-FAC scales the Conv factors per position differently (by
powers of the number of positions), which changes only how γ compares with the
factors.

References:
  Martens, Grosse. Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature. ICML 2015.
  Grosse, Martens. A Kronecker-factored approximate Fisher matrix for
  convolution layers. ICML 2016.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eva_optax._src import kl
from eva_optax._src.alias import Nesterov, with_sgd
from eva_optax._src.hyper import check_period
from eva_optax._src.layers import LayerSlot
from eva_optax._src.statistics import INPUT_FACTOR, OUTPUT_GRAD_FACTOR, LayerStats
from eva_optax._src.linalg import (
  block_diagonal_damped_inverse,
  mean_trace,
  split_bias_row,
  with_bias_row,
)
from eva_optax._src.layerwise_rule import (
  LayerCurvature,
  LayerGradient,
  LayerwiseRule,
  Preconditioned,
  Refresh,
  each_layer,
)
from eva_optax._src.preconditioning import (
  FactorGate,
  LayerwiseOptions,
  layerwise_transformation,
)

#: What :func:`eva_optax.value_and_grad` must capture for K-FAC.
STATISTICS = (INPUT_FACTOR, OUTPUT_GRAD_FACTOR)


def pi_dampings(
  input_factor: jax.Array, output_grad_factor: jax.Array, damping: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """√γ·π and √γ/π with π = sqrt((tr A/dim A)/(tr G/dim G)) (1 where a trace is
  not positive), per matrix of a batch."""
  trace_a, trace_g = mean_trace(input_factor), mean_trace(output_grad_factor)
  ok = (trace_a > 0) & (trace_g > 0)
  pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, trace_a / jnp.where(ok, trace_g, 1.0), 1.0)), 1.0)
  root = jnp.sqrt(damping)
  return root * pi, root / pi


def authors_input_order(input_shape: tuple[int, ...], has_bias: bool) -> tuple[int, ...]:
  """The stored rows of A in the authors' order: the last input axis first.

  A layer's input features are stored in its kernel's order, for a Conv's HWIO
  kernel (kh, kw, C) (index (h·kw + w)·C + c), with the bias row last. The
  authors' K-FAC orders a Conv2d's patches (C, kh, kw) (their
  ``kfac/utils.py`` ``_extract_patches``, the order of PyTorch's OIHW kernel
  flattened), bias last. Entry ``j`` of the result is the stored index of the
  authors' feature ``j``. For one input axis (Dense) it is the identity.
  """
  n = math.prod(input_shape)
  axes = len(input_shape)
  stored = np.arange(n).reshape(input_shape)
  order = stored.transpose((axes - 1,) + tuple(range(axes - 1))).reshape(-1)
  return tuple(order.tolist()) + ((n,) if has_bias else ())


def _reorder_axis(x: jax.Array, axis: int, input_shape: tuple[int, ...], back: bool) -> jax.Array:
  """Axis ``axis`` of ``x`` (the inputs, then maybe a bias entry) from the stored
  order to the authors' (the last input axis first), or ``back``."""
  n, k = math.prod(input_shape), len(input_shape)
  head, tail = jnp.split(x, [n], axis=axis)
  shape = (input_shape[-1],) + input_shape[:-1] if back else input_shape
  head = head.reshape(x.shape[:axis] + shape + x.shape[axis + 1 :])
  src, dst = (axis, axis + k - 1) if back else (axis + k - 1, axis)
  head = jnp.moveaxis(head, src, dst).reshape(x.shape[:axis] + (n,) + x.shape[axis + 1 :])
  return jnp.concatenate([head, tail], axis=axis)


def in_authors_order(
  matrix: jax.Array, input_shape: tuple[int, ...], back: bool = False
) -> jax.Array:
  """P M Pᵀ (``back``: Pᵀ M P) for a factor A over ``input_shape`` inputs
  (then a bias row, which stays last): P takes the stored order of the inputs
  to :func:`authors_input_order`'s. A transpose, no gather."""
  if len(input_shape) <= 1:
    return matrix
  rows = _reorder_axis(matrix, matrix.ndim - 2, input_shape, back)
  return _reorder_axis(rows, matrix.ndim - 1, input_shape, back)


def damped_inverses(
  input_factor: jax.Array,
  output_grad_factor: jax.Array,
  damping: jax.Array,
  diag_blocks: int = 1,
  input_shape: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(A + √γπ I)⁻¹ and (G + √γ/π I)⁻¹ with π = sqrt((tr A/dim A)/(tr G/dim G)),
  each of the block-diagonal part in ``diag_blocks`` blocks when > 1; given the
  layer's ``input_shape``, A's blocks are contiguous in the authors' order
  (:func:`in_authors_order`): Pᵀ B(P A Pᵀ + √γπ I)⁻¹ P, B the block-diagonal
  part."""
  damping_a, damping_g = pi_dampings(input_factor, output_grad_factor, damping)
  if diag_blocks > 1 and input_shape is not None:
    reordered = in_authors_order(input_factor, input_shape)
    a_inv = block_diagonal_damped_inverse(reordered, damping_a, diag_blocks)
    a_inv = in_authors_order(a_inv, input_shape, back=True)
  else:
    a_inv = block_diagonal_damped_inverse(input_factor, damping_a, diag_blocks)
  return a_inv, block_diagonal_damped_inverse(output_grad_factor, damping_g, diag_blocks)


def kfac_precondition(
  grad: LayerGradient, input_inverse: jax.Array, output_grad_inverse: jax.Array
) -> Preconditioned:
  """G⁻¹ Ĝ A⁻¹ (paper orientation) for one layer, and ⟨V, Ĝ⟩."""
  full = with_bias_row(grad.kernel, grad.bias)  # stack + (in[+1], out)
  v = jnp.einsum("...ij,...jo,...op->...ip", input_inverse, full, output_grad_inverse)
  kernel, bias = split_bias_row(v, grad.bias is not None)
  return Preconditioned(kernel, bias, jnp.sum(v * full))


class KfacInverses(NamedTuple):
  """K-FAC's cache of one layer (in the state: a tree per field keyed by module path).

  Attributes:
    input_inverse: (A + √γπ·I)⁻¹ (or of its diagonal blocks), ``stack + (in[+1], in[+1])``.
    output_grad_inverse: (G + √γ/π·I)⁻¹, ``stack + (out, out)``.
  """

  input_inverse: Any
  output_grad_inverse: Any


def kfac_layer(grad: LayerGradient, layer: LayerCurvature, gamma: jax.Array) -> Preconditioned:
  """K-FAC's rule for one layer: G⁻¹ Ĝ A⁻¹ with the cached damped inverses."""
  del gamma  # in the cached inverses
  return kfac_precondition(grad, layer.cache.input_inverse, layer.cache.output_grad_inverse)


def kfac_inverses(
  averages: LayerStats, gamma: jax.Array, slot: LayerSlot, diag_blocks: int = 1
) -> KfacInverses:
  """K-FAC's refresh of one layer: the π-damped inverses of its running A and G
  (:func:`damped_inverses`); with ``diag_blocks > 1``, a convolution's A is cut
  in the authors' order of its inputs."""
  inputs = None
  if averages.kind == "Conv" and diag_blocks > 1:
    layout = slot.layout
    shape = layout.ordered(slot.kernel_shape)
    inputs = tuple(shape[layout.stack_ndim : len(shape) - layout.output_ndim])
  return KfacInverses(
    *damped_inverses(averages.input_factor, averages.output_grad_factor, gamma, diag_blocks, inputs)
  )


def stored_factor_damping(averages: LayerStats, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The authors' in-place damping: √γπ on A's diagonal, √γ/π on G's."""
  return pi_dampings(averages.input_factor, averages.output_grad_factor, gamma)


class ScaleByKfacState(NamedTuple):
  """State of :func:`scale_by_kfac`.

  Attributes:
    count: number of updates so far.
    input_factor: running A per layer, keyed by module path; for a layer
      with a bias, a :class:`~eva_optax._src.statistics.WithBiasRow` (its
      kernel rows and its bias row, ``.matrix()`` for A), so that on a mesh
      its rows split evenly over the devices.
    output_grad_factor: running G per layer.
    cache: a :class:`KfacInverses` whose fields are trees keyed by module
      path: the damped inverses per layer (kept like the factors), refreshed every ``inverse_every``
      steps, each on one device of a mesh
      (:func:`~eva_optax._src.once_per_mesh.once_per_mesh`).
    gate: whether the next update averages the factors, read by
      :func:`eva_optax.factors_due`.
  """

  count: jax.Array
  input_factor: Any
  output_grad_factor: Any
  cache: Any
  gate: FactorGate


def scale_by_kfac(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  stats_every: int = 1,
  inverse_every: int = 10,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
  diag_blocks: int | None = None,
  damp_stored_factors: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC's preconditioner with π-adjusted damping and periodic inverses.

  Args:
    learning_rate: η, for the KL clip.
    damping: γ > 0, float or schedule (read at each refresh). Default 0.03.
    kl_clip: κ > 0. Default 0.001.
    stat_decay: weight of the old running averages of A and G. Default 0.05.
    stats_every: steps between running-average updates of the factors (at
      steps 0, N, 2N, …). The capture computes them on those steps only when
      given ``factors_due=eva_optax.factors_due(opt_state)``; otherwise it
      computes them every step and the others are dropped. Default 1.
    inverse_every: steps between inverse refreshes (the first at step 0).
      Default 10.
    scaling: ``'kl_clip'`` (default) or ``'kl_normalise'``.
    layouts: see :func:`eva_optax.scale_by_eva`.
    diag_blocks: invert only the block-diagonal part of each damped factor,
      in k = this many contiguous diagonal blocks, as the authors' K-FAC does
      (``kfac/kfac.py``, ``_invert_diag_blocks``; 4 at the commit of their
      table 1). A side n splits into min(k, n) blocks, the first n mod k of
      them one longer (⌈n/k⌉, then ⌊n/k⌋); the bias row of A is the last
      row of the last block. A convolution's A is cut in the authors' order
      of its inputs, (C, kh, kw) for the stored (kh, kw, C)
      (:func:`authors_input_order`), and the inverse is put back in the
      stored order (the factors are stored as before); other layers' A (a
      DenseGeneral's several input axes flattened, as a PyTorch Linear sees
      them) and every G are cut in the stored order. Default ``None``: the
      whole factor. It fixes shapes: under ``optax.inject_hyperparams`` pass
      ``static_args=('diag_blocks',)``.
    damp_stored_factors: the authors' in-place damping (their ``kfac.py``,
      ``_invert_diag_blocks`` adds the damping to a view of the stored
      factor): at every inverse refresh, after the inverses, the stored
      running averages become A + √γπ·I and G + √γ/π·I (π of the factors
      before this addition). The damping then stays in the averages: the
      next factor update is A ← β(A + √γπ·I) + (1 − β)A_new (β =
      ``stat_decay``), so A carries Σ_k β^(m_k) √γπ_k of past refreshes
      (m_k: factor updates since refresh k) on its diagonal, which weighs in
      π and in the later inverses; the inverses of a refresh are those of
      the factors before its own addition, as without the option. Only the
      stored running averages differ. ``kfac-authors`` in the examples'
      harness turns it on. Default ``False``.

  References:
    Martens, Grosse. Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature. ICML 2015.
  """

  check_period("inverse_every", inverse_every)
  if diag_blocks is not None:
    check_period("diag_blocks", diag_blocks, static=True)
  blocks = 1 if diag_blocks is None else int(diag_blocks)

  refresh = Refresh(
    inverse_every,
    functools.partial(kfac_inverses, diag_blocks=blocks),
    stored_factor_damping if damp_stored_factors else None,
  )
  return layerwise_transformation(
    LayerwiseRule("scale_by_kfac", STATISTICS, each_layer(kfac_layer), ScaleByKfacState, refresh),
    LayerwiseOptions(learning_rate, damping, kl_clip, stat_decay, scaling, layouts, stats_every),
  )


def kfac(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: Nesterov = False,
  weight_decay: float | jax.Array = 0.0,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  stats_every: int = 1,
  inverse_every: int = 10,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
  diag_blocks: int | None = None,
  damp_stored_factors: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC in front of SGD: precondition → weight decay → momentum → learning rate.

  See :func:`scale_by_kfac`. Capture with
  ``statistics=eva_optax.KFAC_STATISTICS`` and, with ``stats_every > 1``,
  pass ``factors_due=eva_optax.factors_due(opt_state)`` to the gradient
  function so that the factors are computed only on the steps that use them::

      grad_fn = eva_optax.value_and_grad(loss_fn, statistics=eva_optax.KFAC_STATISTICS)
      tx = eva_optax.kfac(0.1, stats_every=10, inverse_every=10)
      ...
      loss, grads, stats = grad_fn(params, batch,
                                   factors_due=eva_optax.factors_due(opt_state))

  The authors' K-FAC (the baseline of the paper's comparisons) is the same rule
  on other factors and inverses: A and G from one row per sample (the mean over
  its positions; G of the mean loss's gradients, N² smaller than the per-sample
  G for N samples, so that π-damping weighs far more), the block-diagonal part
  of each factor inverted in 4 blocks (in their (C, kh, kw) order of a conv's
  inputs), the damping added to the stored factors in place, and their CIFAR
  script's (``batch-cifar10.sh``) factors and inverses every 10 steps with KL
  clip 0.001::

      grad_fn = eva_optax.value_and_grad(
          loss_fn, statistics=eva_optax.KFAC_STATISTICS, factor_rows="samples")
      tx = eva_optax.kfac(0.1, diag_blocks=4, kl_clip=0.001, stats_every=10,
                          inverse_every=10, damp_stored_factors=True,
                          weight_decay=5e-4)

  (They take the factors from the first 16 samples of each batch; this library
  takes the whole batch, the same for batches of ≤ 16.)
  """
  return with_sgd(
    scale_by_kfac(
      learning_rate,
      damping=damping,
      kl_clip=kl_clip,
      stat_decay=stat_decay,
      stats_every=stats_every,
      inverse_every=inverse_every,
      scaling=scaling,
      layouts=layouts,
      diag_blocks=diag_blocks,
      damp_stored_factors=damp_stored_factors,
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
  )
