"""Eva: Kronecker-vectorized second-order preconditioning (Sherman–Morrison).

Symbols: ā — mean layer input (``input_mean``, with a trailing 1 when the layer
has a bias); ḡ — mean gradient w.r.t. the layer output (``output_grad_mean``);
Ĝ = [∇W | ∇b] — the layer's gradient as an ``(out, in + 1)`` matrix; γ —
damping; κ — KL clip; η — learning rate.

Eva approximates a layer's Fisher block by the rank-one (ā ⊗ ḡ)(ā ⊗ ḡ)ᵀ + γI and
applies its inverse with the Sherman–Morrison formula, so no matrix is formed:

    s = ḡᵀ Ĝ ā,    V = (Ĝ − s / (‖ā‖²‖ḡ‖² + γ) · ḡ āᵀ) / γ,

then scales every preconditioned layer by one factor (:mod:`eva_optax.kl`):
the KL clip ν = min(1, sqrt(κ / (η² Σ ⟨V, Ĝ⟩))) (ICLR form, default) or the KL
normalisation of the extension (V without the 1/γ, divided by sqrt(Σ⟨V, Ĝ⟩)).
The alias :func:`eva` then adds weight decay, momentum and the learning rate,
in the authors' order: d = νV + λW; buf = μ·buf + d; W ← W − η·buf.

References:
  Zhang, Shi, Li. Eva: Practical Second-order Optimization with
  Kronecker-vectorized Approximation. ICLR 2023.
  Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
  Second-order Optimization. arXiv:2308.02123.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import kl
from eva_optax._src.alias import Nesterov, with_sgd
from eva_optax._src.statistics import EVA_STATISTICS
from eva_optax._src.layerwise_rule import (
  LayerGradient,
  LayerwiseRule,
  Preconditioned,
  scale_preconditioned,
)
from eva_optax._src.preconditioning import LayerwiseOptions, layerwise_transformation
from eva_optax._src.segments import Segments, sums_in_one_pass
from eva_optax._src.sharded_sums import packed_sums, stack_labels

#: What :func:`eva_optax.value_and_grad` must capture for Eva (its default).
STATISTICS = EVA_STATISTICS


def sherman_morrison(
  grad: LayerGradient,
  input_mean: jax.Array,
  output_grad_mean: jax.Array,
  damping: jax.Array,
) -> Preconditioned:
  """Ĝ − s/(‖ā‖²‖ḡ‖² + γ) · ḡāᵀ for one layer (or a stack of layers), and ⟨·, Ĝ⟩.

  This is γ · (ā āᵀ ⊗ ḡ ḡᵀ + γI)⁻¹ vec(Ĝ): the caller divides by γ (KL clip) or
  normalises (KL normalisation). ``input_mean`` excludes the bias entry; the
  bias row of Ĝ is matched by an implicit 1.

  Args:
    grad: kernel gradient ``stack + (in, out)`` and bias gradient
      ``stack + (out,)`` or ``None``.
    input_mean: ā, ``stack + (in,)``.
    output_grad_mean: ḡ, ``stack + (out,)``.
    damping: γ > 0.

  Returns:
    The projected kernel and bias and ``Σ ⟨projection, Ĝ⟩`` (a scalar).
  """
  p = sherman_morrison_layers([grad], [input_mean], [output_grad_mean], damping)
  return Preconditioned(p.kernel[0], p.bias[0], p.update_dot_grad)


def sherman_morrison_layers(
  grads: Sequence[LayerGradient],
  input_means: Sequence[jax.Array],
  output_grad_means: Sequence[jax.Array],
  damping: jax.Array,
) -> Preconditioned:
  """:func:`sherman_morrison` for many layers at once, with few operations.

  Per layer, the only work over the gradient matrix is one reduction giving
  ``ḡᵀ∇W ā`` and ``‖∇W‖²``; the vector dot products of every layer (‖ā‖²,
  ‖ḡ‖², ḡ·∇b, ‖∇b‖²) are one :class:`~eva_optax.segments.Segments` sum, and
  the rank-one correction is left elementwise, so that XLA fuses it into the
  update that follows (weight decay, momentum, learning rate).

  Returns:
    A :class:`Preconditioned` whose ``kernel`` and ``bias`` are tuples (one
    entry per layer, ``bias`` entries ``None`` without a bias) and whose
    ``update_dot_grad`` is ``Σ_layers ⟨projection, Ĝ⟩``.
  """
  kernels = [g.kernel for g in grads]
  biases = [g.bias for g in grads]
  a, g = list(input_means), list(output_grad_means)
  segments = Segments([k.shape[:-2] for k in kernels])
  with_bias = [b is not None for b in biases]
  zero = [jnp.zeros_like(y) for y in g]
  b_or_0 = [z if b is None else b for b, z in zip(biases, zero)]
  stacks = [stack_labels(k) for k in kernels]
  terms = (
    [(f"{t}io,{t}i,{t}o->{t}", (k, x, y)) for t, k, x, y in zip(stacks, kernels, a, g)]
    + [(f"{t}io,{t}io->{t}", (k, k)) for t, k in zip(stacks, kernels)]
    + [(f"{t}i,{t}i->{t}", (x, x)) for t, x in zip(stacks, a)]
    + [(f"{t}o,{t}o->{t}", (y, y)) for t, y in zip(stacks, g)]
    # A layer without a bias: zeros for both (ḡ would be gathered for nothing).
    + [
      (f"{t}o,{t}o->{t}", (b, y) if h else (b, b))
      for t, b, y, h in zip(stacks, b_or_0, g, with_bias)
    ]
    + [(f"{t}o,{t}o->{t}", (b, b)) for t, b in zip(stacks, b_or_0)]
  )

  def fused(*ops):
    n = len(kernels)
    ks, xs, ys = ops[0 : 3 * n : 3], ops[1 : 3 * n : 3], ops[2 : 3 * n : 3]
    bs = [ops[-2 * n + 2 * l] if with_bias[l] else None for l in range(n)]
    dots = segments.dots(
      [(x, x) for x in xs],
      [(y, y) for y in ys],
      [None if b is None else (b, y) for b, y in zip(bs, ys)],
      [None if b is None else (b, b) for b in bs],
    )
    # Per layer, one pass over the gradient matrix: āᵀ∇W ḡ and ‖∇W‖².
    sums = [
      sums_in_one_pass(k * x[..., :, None] * y[..., None, :], k * k, (k.ndim - 2, k.ndim - 1))
      for k, x, y in zip(ks, xs, ys)
    ]
    return jnp.concatenate(
      [segments.pack([q for q, _ in sums]), segments.pack([m for _, m in sums]), *dots]
    )

  size = segments.size
  # ā and ḡ come back whole (replicated) for the elementwise correction: in the state
  # they may be sharded beyond their kernel (over every device).
  packed, *vectors = packed_sums(
    terms, fused, returns=[(l, j) for l in range(len(kernels)) for j in (1, 2)]
  )
  a, g = list(vectors[0::2]), list(vectors[1::2])
  kernel_dot, kernel_sq, a_sq, g_sq, bias_dot, bias_sq = (
    packed[j * size : (j + 1) * size] for j in range(6)
  )
  s = kernel_dot + bias_dot
  grad_sq = kernel_sq + bias_sq
  has_bias = segments.indicator(with_bias)
  coef = s / ((a_sq + has_bias) * g_sq + damping)
  kernel, bias = [], []
  for l, (k, b, x, y) in enumerate(zip(kernels, biases, a, g)):
    c = segments.of(coef, l)
    kernel.append(k - c[..., None, None] * x[..., :, None] * y[..., None, :])
    bias.append(None if b is None else b - c[..., None] * y)
  # ⟨Ĝ − c ḡāᵀ, Ĝ⟩ = ‖Ĝ‖² − c s: no second pass over the gradient.
  return Preconditioned(tuple(kernel), tuple(bias), jnp.sum(grad_sq - coef * s))


class ScaleByEvaState(NamedTuple):
  """State of :func:`scale_by_eva`.

  Attributes:
    count: number of updates so far (int32).
    input_mean: running average of ā per layer, keyed by module path.
    output_grad_mean: running average of ḡ per layer, keyed by module path.
  """

  count: jax.Array
  input_mean: Any
  output_grad_mean: Any


def scale_by_eva(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva's preconditioner (no learning rate, no sign), as in front of SGD.

  For every Dense/DenseGeneral/Conv/Einsum layer with captured statistics:

      V = (Ĝ − ḡᵀĜā / (‖ā‖²‖ḡ‖² + γ) · ḡāᵀ) / γ,  then ν·V over all such layers,

  with ν the KL clip ``min(1, sqrt(κ / (η² Σ⟨V, Ĝ⟩)))``. Every other parameter
  (norm scales, embeddings, layers the capture passed through) is returned
  unchanged and unscaled; :func:`eva_optax.describe` lists which is which.

  Args:
    learning_rate: η, a float or an optax schedule; used only by the KL clip
      (required when ``scaling='kl_clip'``).
    damping: γ > 0, float or schedule. Default 0.03.
    kl_clip: κ > 0, float or schedule. Default 0.001.
    stat_decay: weight of the **old** running averages of ā and ḡ, in [0, 1);
      the first update takes the new statistics. Default 0.05 (the authors'
      code keeps weight 0.95 on the new value).
    scaling: ``'kl_clip'`` (ICLR 2023, default), ``'kl_normalise'`` (the
      extension: V without 1/γ, divided by sqrt(Σ⟨V, Ĝ⟩)) or ``'none'`` (V
      without 1/γ, unscaled: in front of Adam, which sets the scale itself,
      ``optax.chain(scale_by_eva(scaling='none'), optax.adamw(lr))``).
    layouts: how kernels split into stack/input/output axes (optional; see
      :func:`eva_optax.layouts_of`). Default: each layer's layout is the one
      the capture records. Where the parameters allow several (bias-free
      DenseGeneral and Einsum kernels, stacked layers, depthwise convs), the
      state, sized at ``init``, keeps each statistic in a flat buffer with room
      for every such reading (at most 8× the statistics of the reading the
      shapes suggest); give ``layouts`` to size it exactly, or for a layout
      beyond that room (a grouped conv with several input channels per group).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
    ``stats=`` from :func:`eva_optax.value_and_grad` and ignores other extra
    arguments.

  References:
    Zhang, Shi, Li. Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation. ICLR 2023.
  """

  def precondition(grads, layers, gamma):
    p = sherman_morrison_layers(
      grads,
      [c.stats.input_mean for c in layers],
      [c.stats.output_grad_mean for c in layers],
      gamma,
    )
    return p if scaling != kl.KL_CLIP else scale_preconditioned(p, 1.0 / gamma)

  return layerwise_transformation(
    LayerwiseRule("scale_by_eva", STATISTICS, precondition, ScaleByEvaState),
    LayerwiseOptions(learning_rate, damping, kl_clip, stat_decay, scaling, layouts),
  )


def eva(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: Nesterov = False,
  weight_decay: float | jax.Array = 0.0,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva in front of SGD: precondition → weight decay → momentum → learning rate.

  ``chain(scale_by_eva(learning_rate, ...), add_decayed_weights(weight_decay),
  sgd(learning_rate, momentum, nesterov))``, i.e. d = νV + λW;
  buf = μ·buf + d; W ← W − η·buf (weight decay neither preconditioned nor in
  the KL sum). See :func:`scale_by_eva` for the preconditioner's arguments.

  Args:
    learning_rate: η, float or optax schedule.
    momentum: μ (``None`` for none). Default 0.9.
    nesterov: ``True``, Nesterov momentum; ``False`` (default), heavy ball;
      ``'authors'``, the authors' double update (see :func:`eva_optax.shampoo`).
    weight_decay: λ ≥ 0, added after preconditioning. Default 0.
    damping, kl_clip, stat_decay, scaling, layouts: see :func:`scale_by_eva`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``stats=`` to ``update``.

  Example::

      tx = eva_optax.eva(0.01, momentum=0.9, weight_decay=5e-4)  # SGD's rate 0.1 / 10
      grad_fn = eva_optax.value_and_grad(loss_fn)
      loss, grads, stats = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)

  References:
    Zhang, Shi, Li. Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation. ICLR 2023.
  """
  return with_sgd(
    scale_by_eva(
      learning_rate,
      damping=damping,
      kl_clip=kl_clip,
      stat_decay=stat_decay,
      scaling=scaling,
      layouts=layouts,
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
  )
