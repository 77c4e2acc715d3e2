"""Eva-f: vectorized FOOF, the input-side Kronecker vector only.

FOOF preconditions a layer's gradient with its input factor only,
Ĝ (A + γI)⁻¹. Eva-f replaces A by the rank-one ā āᵀ, whose damped inverse
follows from Sherman–Morrison:

    V = Ĝ − (Ĝ ā) āᵀ / (‖ā‖² + γ)        (= γ · Ĝ (ā āᵀ + γI)⁻¹)

(ā with a trailing 1 when the layer has a bias). It needs only the forward
statistic, so the capture skips the backward probes:
``eva_optax.value_and_grad(loss_fn, statistics=eva_optax.EVA_FOOF_STATISTICS)``.
By default the updates are normalised across layers (the extension's KL
normalisation, V / sqrt(Σ⟨V, Ĝ⟩)); ``scaling='kl_clip'`` uses V / γ and the
KL clip instead.

References:
  Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
  Second-order Optimization. arXiv:2308.02123.
  Benzing. Gradient descent on neurons and its link to approximate
  second-order optimization (FOOF). ICML 2022.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import kl
from eva_optax._src.alias import Nesterov, with_sgd
from eva_optax._src.statistics import INPUT_MEAN
from eva_optax._src.layerwise_rule import (
  LayerGradient,
  LayerwiseRule,
  Preconditioned,
  scale_preconditioned,
)
from eva_optax._src.preconditioning import LayerwiseOptions, layerwise_transformation
from eva_optax._src.segments import Segments, sums_in_one_pass
from eva_optax._src.sharded_sums import packed_sums, stack_labels

#: What :func:`eva_optax.value_and_grad` must capture for Eva-f.
STATISTICS = (INPUT_MEAN,)


def foof_vector_projection(
  grad: LayerGradient, input_mean: jax.Array, damping: jax.Array
) -> Preconditioned:
  """Ĝ − (Ĝā)āᵀ/(‖ā‖² + γ) for one layer (or a stack), and its ⟨·, Ĝ⟩.

  Args:
    grad: kernel gradient ``stack + (in, out)``, bias gradient ``stack + (out,)``
      or ``None`` (matched by an implicit 1 in ā).
    input_mean: ā, ``stack + (in,)``.
    damping: γ > 0.
  """
  p = foof_vector_projection_layers([grad], [input_mean], damping)
  return Preconditioned(p.kernel[0], p.bias[0], p.update_dot_grad)


def foof_vector_projection_layers(
  grads: Sequence[LayerGradient], input_means: Sequence[jax.Array], damping: jax.Array
) -> Preconditioned:
  """:func:`foof_vector_projection` for many layers at once, with few operations.

  Per layer, one pass over the gradient matrix gives both Ĝā (its columns
  weighted by ā) and the column norms of ∇W; every other sum (‖ā‖², ‖Ĝā‖²,
  ‖∇W‖², ‖∇b‖²) is one :class:`~eva_optax.segments.Segments` sum for all
  layers, and the rank-one correction stays elementwise (fused into the update).

  Returns:
    A :class:`Preconditioned` with tuples of kernels and biases (one per
    layer) and ``Σ_layers ⟨V, Ĝ⟩``.
  """
  kernels = [g.kernel for g in grads]
  biases = [g.bias for g in grads]
  a = list(input_means)
  segments = Segments([k.shape[:-2] for k in kernels])
  stacks = [stack_labels(k) for k in kernels]
  with_bias = [b is not None for b in biases]
  n = len(kernels)
  vectors = [k.shape[:-2] + k.shape[-1:] for k in kernels]  # stack + (out,)
  terms = (
    [(f"{t}io,{t}i->{t}o", (k, x)) for t, k, x in zip(stacks, kernels, a)]
    + [(f"{t}io,{t}io->{t}o", (k, k)) for t, k in zip(stacks, kernels)]
    + [(f"{t}i,{t}i->{t}", (x, x)) for t, x in zip(stacks, a)]
    + [(f"{t}o->{t}o", (b,)) for t, b in zip(stacks, biases) if b is not None]
  )

  def fused(*ops):
    ks, xs = ops[0 : 2 * n : 2], ops[1 : 2 * n : 2]
    # Per layer, one pass over the gradient matrix: ∇W ā and its column norms.
    sums = [sums_in_one_pass(k * x[..., :, None], k * k, (k.ndim - 2,)) for k, x in zip(ks, xs)]
    (a_sq,) = segments.dots([(x, x) for x in xs])
    flat = lambda vs: [jnp.reshape(v, -1) for v in vs]
    return jnp.concatenate(
      flat([p for p, _ in sums]) + flat([c for _, c in sums]) + [a_sq] + flat(ops[6 * n :])
    )

  def finish(packed, damping):
    """The packed sums → every layer's coefficients (Ĝā)/(‖ā‖² + γ), then ⟨V, Ĝ⟩."""
    pieces, offset = [], 0
    for size in (
      [math.prod(v) for v in vectors] * 2
      + [segments.size]
      + [math.prod(v) for v, b in zip(vectors, with_bias) if b]
    ):
      pieces.append(packed[offset : offset + size])
      offset += size
    it = iter(pieces[2 * n + 1 :])
    bias = [next(it).reshape(v) if b else None for v, b in zip(vectors, with_bias)]
    projected = [  # Ĝ ā, the bias matched by a 1
      p.reshape(v) + (0 if b is None else b) for p, v, b in zip(pieces[:n], vectors, bias)
    ]
    column_sq = [c.reshape(v) for c, v in zip(pieces[n : 2 * n], vectors)]
    a_sq = pieces[2 * n]
    projected_sq, grad_sq, bias_sq = segments.dots(
      [(p, p) for p in projected],
      [(c, jnp.ones_like(c)) for c in column_sq],
      [None if b is None else (b, b) for b in bias],
    )
    has_bias = segments.indicator(with_bias)
    scale = 1.0 / (a_sq + has_bias + damping)
    coef = [p * segments.of(scale, l)[..., None] for l, p in enumerate(projected)]
    # ⟨V, Ĝ⟩ = ‖Ĝ‖² − ‖Ĝā‖²/(‖ā‖² + γ).
    dot = jnp.sum(grad_sq + bias_sq - projected_sq * scale)
    return (*coef, dot)

  (*coefs, dot), *a = packed_sums(
    terms, fused, finish, (jnp.asarray(damping),), returns=[(l, 1) for l in range(n)]
  )
  kernel = tuple(k - x[..., :, None] * c[..., None, :] for k, x, c in zip(kernels, a, coefs))
  bias = tuple(None if b is None else b - c for b, c in zip(biases, coefs))
  return Preconditioned(kernel, bias, dot)


class ScaleByEvaFoofState(NamedTuple):
  """State of :func:`scale_by_eva_foof`: the update count and running ā per layer."""

  count: jax.Array
  input_mean: Any


def scale_by_eva_foof(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  scaling: str = kl.KL_NORMALISE,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-f's preconditioner: V = Ĝ − (Ĝā)āᵀ/(‖ā‖² + γ), normalised across layers.

  Args:
    learning_rate: η, used only with ``scaling='kl_clip'``.
    damping: γ > 0, float or schedule. Default 0.03.
    kl_clip: κ > 0, used only with ``scaling='kl_clip'``. Default 0.001.
    stat_decay: weight of the old running average of ā. Default 0.05.
    scaling: ``'kl_normalise'`` (default, the extension's form),
      ``'kl_clip'`` (V/γ, then the KL clip, as Eva's ICLR form) or ``'none'``
      (V unscaled, in front of Adam: ``optax.chain(scale_by_eva_foof(
      scaling='none'), optax.adamw(lr))``).
    layouts: see :func:`eva_optax.scale_by_eva`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``stats=``
    captured with ``statistics=('input_mean',)`` (or more).

  References:
    Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
    Second-order Optimization. arXiv:2308.02123.
  """

  def precondition(grads, layers, gamma):
    p = foof_vector_projection_layers(grads, [c.stats.input_mean for c in layers], gamma)
    return p if scaling != kl.KL_CLIP else scale_preconditioned(p, 1.0 / gamma)

  return layerwise_transformation(
    LayerwiseRule("scale_by_eva_foof", STATISTICS, precondition, ScaleByEvaFoofState),
    LayerwiseOptions(learning_rate, damping, kl_clip, stat_decay, scaling, layouts),
  )


def eva_foof(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: Nesterov = False,
  weight_decay: float | jax.Array = 0.0,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  scaling: str = kl.KL_NORMALISE,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-f in front of SGD: precondition → weight decay → momentum → learning rate.

  See :func:`scale_by_eva_foof`; the tail is as in :func:`eva_optax.eva`.
  Capture with ``eva_optax.value_and_grad(loss_fn, statistics=('input_mean',))``.

  References:
    Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
    Second-order Optimization. arXiv:2308.02123.
  """
  return with_sgd(
    scale_by_eva_foof(
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
