"""What a layer-wise rule is made of: its inputs, its output, one typed description.

A layer-wise rule (Eva, Eva-f, K-FAC, FOOF) is a :class:`LayerwiseRule`: the
statistics it keeps running averages of, how it preconditions the layers of one
step, its state class, and optionally a :class:`Refresh` of a per-layer cache
every few steps (K-FAC's and FOOF's inverses).
:func:`eva_optax._src.preconditioning.layerwise_transformation` composes a
rule with what every rule shares (finding the layers, the averages, the KL
scaling, the pass-through of every other parameter).

A rule sees each layer as a :class:`LayerGradient` (its gradient as a matrix)
and a :class:`LayerCurvature` (the running averages of its statistics as a
:class:`~eva_optax._src.statistics.LayerStats`, and its cache), and returns a
:class:`Preconditioned`.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable, Sequence

import jax

from eva_optax._src.layers import LayerSlot
from eva_optax._src.statistics import LayerStats


class LayerGradient(NamedTuple):
  """A layer's gradient as a matrix: kernel ``stack + (in, out)``, bias ``stack + (out,)``."""

  kernel: jax.Array
  bias: jax.Array | None


class Preconditioned(NamedTuple):
  """A preconditioned update ``V`` and ``Σ ⟨V, Ĝ⟩`` over its entries.

  For one layer, ``kernel`` and ``bias`` are arrays (``bias`` ``None`` without
  one); for a group of layers (a rule applied to all layers at once), they are
  tuples with one entry per layer and ``update_dot_grad`` is the sum over the
  group.
  """

  kernel: Any
  bias: Any
  update_dot_grad: jax.Array


class LayerCurvature(NamedTuple):
  """What a rule knows of one layer's curvature at this step.

  Attributes:
    stats: the running averages of the rule's statistics (the others
      ``None``), whole matrices, with the layer's kind, layout and bias flag.
    cache: the layer's entry of the rule's cache (the NamedTuple its
      :class:`Refresh` computes, as of the last refresh); ``None`` for a rule
      without one.
  """

  stats: LayerStats
  cache: Any = None


#: ``(gradient, curvature, γ) -> Preconditioned`` for one layer.
LayerRule = Callable[[LayerGradient, LayerCurvature, jax.Array], Preconditioned]
#: ``(gradients, curvatures, γ) -> Preconditioned`` for all the layers of a step at once.
GroupRule = Callable[[Sequence[LayerGradient], Sequence[LayerCurvature], jax.Array], Preconditioned]


class Refresh(NamedTuple):
  """A per-layer cache recomputed from the running averages every ``every`` steps.

  Attributes:
    every: steps between refreshes, the first at step 0 (K-FAC's and FOOF's
      ``inverse_every``).
    compute: ``(averages, γ, slot) -> cache`` for one layer: ``averages`` a
      :class:`~eva_optax._src.statistics.LayerStats` of whole matrices,
      ``slot`` the layer's :class:`~eva_optax._src.layers.LayerSlot` (kernel
      shape and layout), ``cache`` a NamedTuple of arrays, the same class for
      every layer. The state keeps one tree per field of that class.
    shift: optional ``(averages, γ) -> shifts``, one per statistic of the rule
      (in its order; ``None`` for none): a scalar (per stack entry) added to
      the diagonal of that stored running average on every refresh step, after
      the refresh. The authors' K-FAC damps its stored factors in place
      (:func:`eva_optax.scale_by_kfac`, ``damp_stored_factors``).
  """

  every: int | jax.Array
  compute: Callable[[LayerStats, jax.Array, LayerSlot], Any]
  shift: Callable[[LayerStats, jax.Array], tuple[jax.Array | None, ...]] | None = None


class LayerwiseRule(NamedTuple):
  """One layer-wise preconditioner, as :func:`layerwise_transformation` composes it.

  Attributes:
    name: the transformation's name in error messages (``'scale_by_eva'``).
    statistics: the statistics whose running averages the state keeps (and
      the capture must deliver), e.g. ``eva_optax.EVA_STATISTICS``.
    precondition: a :data:`GroupRule`, all the layers of a step at once
      (:func:`each_layer` turns a rule for one layer into one).
    state: the NamedTuple class of the state: ``count``, one field per
      statistic, ``cache`` with a :class:`Refresh`, and ``gate`` (a
      ``FactorGate``) when a statistic is a factor A or G.
    refresh: the cache and its period, or ``None``.
  """

  name: str
  statistics: tuple[str, ...]
  precondition: GroupRule
  state: type
  refresh: Refresh | None = None


def each_layer(rule: LayerRule) -> GroupRule:
  """A rule for one layer as a rule for a group: applied to each, dots summed."""

  def group(grads, curvatures, gamma):
    results = [rule(g, c, gamma) for g, c in zip(grads, curvatures)]
    return Preconditioned(
      tuple(r.kernel for r in results),
      tuple(r.bias for r in results),
      sum(r.update_dot_grad for r in results),
    )

  return group


def scale_preconditioned(p: Preconditioned, factor: jax.Array) -> Preconditioned:
  """``factor · V`` and ``factor · ⟨V, Ĝ⟩`` (one layer or a group)."""
  times = lambda x: jax.tree.map(lambda v: v * factor, x)
  return Preconditioned(times(p.kernel), times(p.bias), p.update_dot_grad * factor)
