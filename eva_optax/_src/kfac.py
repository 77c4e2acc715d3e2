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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import kl
from eva_optax._src.alias import with_sgd
from eva_optax._src.hyper import check_period
from eva_optax._src.statistics import INPUT_FACTOR, OUTPUT_GRAD_FACTOR
from eva_optax._src.linalg import (
  block_diagonal_damped_inverse,
  mean_trace,
  split_bias_row,
  with_bias_row,
)
from eva_optax._src.preconditioning import (
  FactorGate,
  LayerGradient,
  Preconditioned,
  layerwise_transformation,
)

#: What :func:`eva_optax.value_and_grad` must capture for K-FAC.
STATISTICS = (INPUT_FACTOR, OUTPUT_GRAD_FACTOR)


def damped_inverses(
  input_factor: jax.Array,
  output_grad_factor: jax.Array,
  damping: jax.Array,
  diag_blocks: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """(A + √γπ I)⁻¹ and (G + √γ/π I)⁻¹ with π = sqrt((tr A/dim A)/(tr G/dim G)),
  each of the block-diagonal part in ``diag_blocks`` blocks when > 1."""
  trace_a, trace_g = mean_trace(input_factor), mean_trace(output_grad_factor)
  ok = (trace_a > 0) & (trace_g > 0)
  pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, trace_a / jnp.where(ok, trace_g, 1.0), 1.0)), 1.0)
  root = jnp.sqrt(damping)
  return (
    block_diagonal_damped_inverse(input_factor, root * pi, diag_blocks),
    block_diagonal_damped_inverse(output_grad_factor, root / pi, diag_blocks),
  )


def kfac_precondition(
  grad: LayerGradient, input_inverse: jax.Array, output_grad_inverse: jax.Array
) -> Preconditioned:
  """G⁻¹ Ĝ A⁻¹ (paper orientation) for one layer, and ⟨V, Ĝ⟩."""
  full = with_bias_row(grad.kernel, grad.bias)  # stack + (in[+1], out)
  v = jnp.einsum("...ij,...jo,...op->...ip", input_inverse, full, output_grad_inverse)
  kernel, bias = split_bias_row(v, grad.bias is not None)
  return Preconditioned(kernel, bias, jnp.sum(v * full))


class ScaleByKfacState(NamedTuple):
  """State of :func:`scale_by_kfac`.

  Attributes:
    count: number of updates so far.
    input_factor: running A per layer, keyed by module path; for a layer
      with a bias, a :class:`~eva_optax._src.statistics.WithBiasRow` (its
      kernel rows and its bias row, ``.matrix()`` for A), so that on a mesh
      its rows split evenly over the devices.
    output_grad_factor: running G per layer.
    cache: ``{'input_inverse', 'output_grad_inverse'}``: the damped inverses
      per layer (kept like the factors), refreshed every ``inverse_every``
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
      in this many blocks (the authors' K-FAC uses 4). Default ``None``: the
      whole factor. It fixes shapes: under ``optax.inject_hyperparams`` pass
      ``static_args=('diag_blocks',)``.

  References:
    Martens, Grosse. Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature. ICML 2015.
  """

  check_period("inverse_every", inverse_every)
  if diag_blocks is not None:
    check_period("diag_blocks", diag_blocks, static=True)
  blocks = 1 if diag_blocks is None else int(diag_blocks)

  def refresh(averages, gamma):
    a_inv, g_inv = damped_inverses(
      averages["input_factor"], averages["output_grad_factor"], gamma, blocks
    )
    return {"input_inverse": a_inv, "output_grad_inverse": g_inv}

  return layerwise_transformation(
    who="scale_by_kfac",
    state_cls=ScaleByKfacState,
    statistics=STATISTICS,
    precondition=lambda grad, s, gamma: kfac_precondition(
      grad, s["input_inverse"], s["output_grad_inverse"]
    ),
    learning_rate=learning_rate,
    damping=damping,
    kl_clip=kl_clip,
    stat_decay=stat_decay,
    scaling=scaling,
    layouts=layouts,
    refresh=refresh,
    refresh_every=inverse_every,
    stats_every=stats_every,
  )


def kfac(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: bool = False,
  weight_decay: float | jax.Array = 0.0,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  stats_every: int = 1,
  inverse_every: int = 10,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
  diag_blocks: int | None = None,
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
  of each factor inverted in 4 blocks, KL clip 0.01 in their CIFAR script::

      grad_fn = eva_optax.value_and_grad(
          loss_fn, statistics=eva_optax.KFAC_STATISTICS, factor_rows="samples")
      tx = eva_optax.kfac(0.1, diag_blocks=4, kl_clip=0.01, weight_decay=5e-4)

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
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
  )
