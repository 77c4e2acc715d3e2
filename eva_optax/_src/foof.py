"""FOOF: preconditioning with the input factor only (a baseline for Eva-f).

    V = Ĝ (A + γI)⁻¹,      A = E[â âᵀ] (â = [a, 1] with a bias),

with A averaged over steps and its damped inverse recomputed every
``inverse_every`` steps (50 in the paper's runs), then the KL clip across
layers as in Eva. Capture with
``eva_optax.value_and_grad(loss_fn, statistics=eva_optax.FOOF_STATISTICS)``.

References:
  Benzing. Gradient descent on neurons and its link to approximate
  second-order optimization. ICML 2022.
  Zhang, Shi, Li. Eva: A General Vectorized Approximation Framework for
  Second-order Optimization. arXiv:2308.02123.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import kl
from eva_optax._src.alias import Nesterov, with_sgd
from eva_optax._src.hyper import check_period
from eva_optax._src.statistics import INPUT_FACTOR
from eva_optax._src.linalg import damped_inverse, split_bias_row, with_bias_row
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

#: What :func:`eva_optax.value_and_grad` must capture for FOOF.
STATISTICS = (INPUT_FACTOR,)


def foof_precondition(grad: LayerGradient, input_inverse: jax.Array) -> Preconditioned:
  """Ĝ (A + γI)⁻¹ for one layer given the inverse, and ⟨V, Ĝ⟩."""
  full = with_bias_row(grad.kernel, grad.bias)
  v = jnp.einsum("...ij,...jo->...io", input_inverse, full)
  kernel, bias = split_bias_row(v, grad.bias is not None)
  return Preconditioned(kernel, bias, jnp.sum(v * full))


class FoofInverse(NamedTuple):
  """FOOF's cache of one layer (in the state: a tree keyed by module path).

  Attributes:
    input_inverse: (A + γI)⁻¹, ``stack + (in[+1], in[+1])``.
  """

  input_inverse: Any


def foof_inverse(averages, gamma: jax.Array, slot=None) -> FoofInverse:
  """FOOF's refresh of one layer: (A + γI)⁻¹ of its running A."""
  del slot
  return FoofInverse(damped_inverse(averages.input_factor, gamma))


def foof_layer(grad: LayerGradient, layer: LayerCurvature, gamma: jax.Array) -> Preconditioned:
  """FOOF's rule for one layer: Ĝ (A + γI)⁻¹ with the cached inverse."""
  del gamma  # in the cached inverse
  return foof_precondition(grad, layer.cache.input_inverse)


class ScaleByFoofState(NamedTuple):
  """State of :func:`scale_by_foof`.

  Attributes:
    count: number of updates so far.
    input_factor: running A per layer, keyed by module path (for a layer
      with a bias, a :class:`~eva_optax._src.statistics.WithBiasRow`: see
      :class:`eva_optax.ScaleByKfacState`).
    cache: a :class:`FoofInverse` whose field is a tree keyed by module
      path: (A + γI)⁻¹ per layer, kept like A, refreshed every ``inverse_every`` steps, each on one device of a mesh.
    gate: whether the next update averages the factor, read by
      :func:`eva_optax.factors_due`.
  """

  count: jax.Array
  input_factor: Any
  cache: Any
  gate: FactorGate


def scale_by_foof(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  stats_every: int = 1,
  inverse_every: int = 50,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF's preconditioner: V = Ĝ (A + γI)⁻¹, inverse every ``inverse_every`` steps.

  Args:
    learning_rate: η, for the KL clip.
    damping: γ > 0, float or schedule (read at each refresh). Default 0.03.
    kl_clip: κ > 0. Default 0.001.
    stat_decay: weight of the old running average of A. Default 0.05.
    stats_every: steps between running-average updates of A; see
      :func:`eva_optax.scale_by_kfac` and :func:`eva_optax.factors_due`.
      Default 1.
    inverse_every: steps between inverse refreshes (the first at step 0).
      Default 50, the paper's value.
    scaling: ``'kl_clip'`` (default) or ``'kl_normalise'``.
    layouts: see :func:`eva_optax.scale_by_eva`.

  References:
    Benzing. Gradient descent on neurons and its link to approximate
    second-order optimization. ICML 2022.
  """

  check_period("inverse_every", inverse_every)

  return layerwise_transformation(
    LayerwiseRule(
      "scale_by_foof",
      STATISTICS,
      each_layer(foof_layer),
      ScaleByFoofState,
      Refresh(inverse_every, foof_inverse),
    ),
    LayerwiseOptions(learning_rate, damping, kl_clip, stat_decay, scaling, layouts, stats_every),
  )


def foof(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float | jax.Array | None = 0.9,
  nesterov: Nesterov = False,
  weight_decay: float | jax.Array = 0.0,
  damping: optax.ScalarOrSchedule = 0.03,
  kl_clip: optax.ScalarOrSchedule = 0.001,
  stat_decay: float | jax.Array = 0.05,
  stats_every: int = 1,
  inverse_every: int = 50,
  scaling: str = kl.KL_CLIP,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF in front of SGD: precondition → weight decay → momentum → learning rate.

  See :func:`scale_by_foof`. Capture with ``statistics=('input_factor',)``.
  """
  return with_sgd(
    scale_by_foof(
      learning_rate,
      damping=damping,
      kl_clip=kl_clip,
      stat_decay=stat_decay,
      stats_every=stats_every,
      inverse_every=inverse_every,
      scaling=scaling,
      layouts=layouts,
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
  )
