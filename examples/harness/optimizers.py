"""The optimizers the examples compare, built the same way for every task.

Every optimizer gets the same learning-rate schedule shape, momentum 0.9 wherever it
has momentum, and L2 weight decay added to the gradient (``weight_decay`` × params),
except AdamW and Muon whose decay is decoupled. How a step gets its gradients is read from
the optimizer's state, not from its entry here (:func:`examples.harness.training.make_step`):
``eva_optax.statistics_needed`` names the statistics its layer-wise parts average (Eva,
Eva-f, K-FAC, FOOF: ``eva_optax.value_and_grad(..., statistics=...)``; none: a plain
``jax.value_and_grad``), ``eva_optax.has_factor_gate`` says whether to pass
``factors_due=eva_optax.factors_due(opt_state)`` so that the Kronecker factors are only
computed on the steps that use them (K-FAC, FOOF), and every ``update`` gets ``obj_fn``, the
loss of this batch as a function of the parameters, which Sophia's Hessian-vector products
need and every other optimizer ignores.

``kfac-authors`` is K-FAC as the paper's authors ran it, with their CIFAR script's settings
(factors from one row per sample, ``factor_rows='samples'``; factors and inverses every 10
steps; block-diagonal inverses in 4 blocks cut in their (C, kh, kw) order; the damping added
to the stored factors in place, ``damp_stored_factors=True``; KL clip 0.001), beside the
textbook ``kfac``.

``statistics`` is what the abstract capture pass that finds every layer's
:class:`eva_optax.KernelLayout` records (``layouts=``, for the optimizers that take it):
Muon takes no statistics but names the cheapest, ``('input_mean',)``, so that it sees
DenseGeneral and convolution kernels as the matrices Eva sees.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

import eva_optax


@dataclass(frozen=True)
class Options:
  """Hyperparameters shared by every optimizer of a run (``None``: the optimizer's default)."""

  momentum: float = 0.9
  weight_decay: float = 5e-4
  damping: float | None = None
  kl_clip: float | None = None
  stat_decay: float | None = None
  scaling: str | None = None  # Eva's "kl_clip" or "kl_normalise"
  # Top-level modules left unpreconditioned (e.g. a language model's output layer): their
  # parameters get SGD with the same momentum and weight decay, through optax.partition.
  plain_modules: tuple[str, ...] = ()
  # The learning rate of the parameters outside a layer (``eva_optax.layer_labels``'
  # "outside": embeddings, norm scales and offsets), which Eva and its family pass
  # through, as a multiple of η; other than 1 they get SGD at that rate (momentum and
  # weight decay as above), through optax.partition.
  passthrough_scale: float = 1.0


@dataclass(frozen=True)
class Spec:
  """One optimizer: its ``--optimizers`` key, display name and constructor."""

  key: str
  name: str
  factory: Callable[..., optax.GradientTransformation]
  statistics: Any = None  # what the abstract capture pass for ``layouts=`` records
  extra: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of ``factory``
  capture_options: tuple[tuple[str, Any], ...] = ()  # of eva_optax.value_and_grad

  def accepts(self, argument: str) -> bool:
    """Whether the constructor takes ``argument`` (e.g. ``damping``, ``kl_clip``)."""
    return argument in inspect.signature(self.factory).parameters

  def build(
    self, learning_rate: optax.ScalarOrSchedule, options: Options, **kwargs: Any
  ) -> optax.GradientTransformation:
    """The transformation, with ``options`` applied where the optimizer has them.

    ``kwargs`` go to the eva_optax constructor (e.g. ``layouts=``).
    """
    if self.key == "sgd":
      return optax.chain(
        optax.add_decayed_weights(options.weight_decay),
        optax.sgd(learning_rate, momentum=options.momentum),
      )
    if self.key == "adamw":
      return optax.adamw(learning_rate, weight_decay=options.weight_decay)
    kwargs = {**dict(self.extra), **kwargs}
    kwargs.update(momentum=options.momentum, weight_decay=options.weight_decay)
    for name in ("damping", "kl_clip", "stat_decay", "scaling"):
      value = getattr(options, name)
      if value is not None and self.accepts(name):
        kwargs[name] = value
    tx = self.factory(learning_rate, **kwargs)
    if not options.plain_modules and options.passthrough_scale == 1.0:
      return tx
    sgd = SPEC_BY_KEY["sgd"]
    transforms = {"preconditioned": tx}
    if options.plain_modules:
      transforms["plain"] = sgd.build(learning_rate, options)
    if options.passthrough_scale != 1.0:
      transforms["passthrough"] = sgd.build(
        _scaled_rate(learning_rate, options.passthrough_scale), options
      )
    return optax.partition(
      transforms,
      lambda params: plain_labels(params, options.plain_modules, options.passthrough_scale != 1.0),
    )


def plain_labels(params: Any, modules: tuple[str, ...], passthrough: bool = False) -> Any:
  """``"plain"`` for every parameter under a top-level module of ``modules``; with
  ``passthrough``, ``"passthrough"`` for every other parameter outside a layer
  (``eva_optax.layer_labels``' ``"outside"``: what Eva and its family return unchanged);
  else ``"preconditioned"``. A name that is not a top-level module is a ``ValueError``."""
  missing = set(modules) - set(params)
  if missing:
    raise ValueError(
      f"plain_modules: no top-level module {sorted(missing)}; the model has {sorted(params)}"
    )

  def label(path: tuple[Any, ...], library: str) -> str:
    if getattr(path[0], "key", None) in modules:
      return "plain"
    return "passthrough" if passthrough and library == "outside" else "preconditioned"

  return jax.tree_util.tree_map_with_path(label, eva_optax.layer_labels(params))


def has_passthrough(params: Any) -> bool:
  """Whether ``params`` has parameters outside a layer (``eva_optax.layer_labels``)."""
  return "outside" in jax.tree.leaves(eva_optax.layer_labels(params))


def _scaled_rate(learning_rate: optax.ScalarOrSchedule, factor: float) -> optax.ScalarOrSchedule:
  if callable(learning_rate):
    return lambda count: factor * learning_rate(count)
  return factor * learning_rate


def _layout_at(layouts: Any, module: tuple[str, ...]) -> eva_optax.KernelLayout | None:
  node = layouts
  for name in module:
    if not hasattr(node, "get"):
      return None
    node = node.get(name)
  return node if isinstance(node, eva_optax.KernelLayout) else None


def muon_dimension_numbers(params: Any, layouts: Any = None) -> Any:
  """Muon's view of every layer kernel as a matrix: ``stack + inputs + outputs`` axes.

  A ``kernel`` of rank ≥ 2 gets ``MuonDimensionNumbers(inputs, outputs)`` (its stack
  axes, for layers stacked by ``nn.scan``, are Muon's batch axes: one matrix per
  layer); every other parameter (biases, norms, embeddings) gets ``None``, i.e. Muon's
  AdamW. The axes come from ``layouts`` (:func:`eva_optax.layouts_of` of a capture, keyed
  by module path) where it names the layer, else the kernel is read as Dense or HWIO
  convolution: every axis but the last is an input.
  """

  def numbers(path: tuple[Any, ...], leaf: Any) -> MuonDimensionNumbers | None:
    names = tuple(str(getattr(k, "key", k)) for k in path)
    if not names or names[-1] != "kernel" or jnp.ndim(leaf) < 2:
      return None
    layout = _layout_at(layouts, names[:-1]) or eva_optax.KernelLayout()
    rank = jnp.ndim(leaf)
    return MuonDimensionNumbers(
      reduction_axis=tuple(range(layout.stack_ndim, rank - layout.output_ndim)),
      output_axis=tuple(range(rank - layout.output_ndim, rank)),
    )

  return jax.tree_util.tree_map_with_path(numbers, params)


def muon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.95,
  weight_decay: float = 0.0,
  layouts: Any = None,
) -> optax.GradientTransformation:
  """``optax.contrib.muon`` on every layer kernel (:func:`muon_dimension_numbers`).

  ``momentum`` is Muon's ``beta`` (Nesterov), ``weight_decay`` its decoupled decay of
  the kernels; the other parameters go to Muon's AdamW with the same learning rate and
  no decay, as in ``optax.contrib.muon``.
  """
  return optax.contrib.muon(
    learning_rate,
    beta=momentum,
    weight_decay=weight_decay,
    muon_weight_dimension_numbers=lambda params: muon_dimension_numbers(params, layouts),
  )


def sophia(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.965,
  weight_decay: float = 0.0,
  update_interval: int = 10,
) -> optax.GradientTransformationExtraArgs:
  """``optax.contrib.sophia`` (Sophia-H): momentum over the Hessian diagonal's running
  average, clipped elementwise, the diagonal estimated (Hutchinson) every
  ``update_interval`` steps from ``obj_fn``, which ``update`` must be given.

  ``momentum`` is Sophia's ``b1``, ``weight_decay`` its decoupled decay (× lr, as AdamW);
  the rest are optax's defaults (``b2`` 0.99, ``gamma`` 0.01, clip threshold 1).
  """
  return optax.contrib.sophia(
    learning_rate, b1=momentum, weight_decay=weight_decay, update_interval=update_interval
  )


def _in_front_of_adamw(scale_by: Callable[..., optax.GradientTransformation]) -> Callable:
  """``optax.chain(scale_by(damping, stat_decay, scaling='none'), optax.adamw(...))``: Eva's
  (or Eva-f's) preconditioned gradient V, unscaled (Adam's per-coordinate scale would
  cancel a global ν but for ε and the moments' history, :mod:`eva_optax._src.kl`), as
  AdamW's gradient; AdamW as the ``adamw`` entry (b1 = ``momentum``, 0.9 by default,
  decoupled ``weight_decay``). Its grid centres on AdamW's rate
  (:func:`examples.harness.protocol_search.centre_key`)."""

  def factory(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: float = 0.05,
    scaling: str = "none",
    layouts: Any = None,
  ) -> optax.GradientTransformationExtraArgs:
    return optax.chain(
      scale_by(
        learning_rate if scaling == "kl_clip" else None,
        damping=damping,
        stat_decay=stat_decay,
        scaling=scaling,
        layouts=layouts,
      ),
      optax.adamw(learning_rate, b1=momentum, weight_decay=weight_decay),
    )

  return factory


eva_adamw = _in_front_of_adamw(eva_optax.scale_by_eva)
eva_foof_adamw = _in_front_of_adamw(eva_optax.scale_by_eva_foof)


SPECS: tuple[Spec, ...] = (
  Spec("sgd", "SGD", optax.sgd),
  Spec("adamw", "AdamW", optax.adamw),
  Spec("eva", "Eva", eva_optax.eva, eva_optax.EVA_STATISTICS),
  Spec("eva-f", "Eva-f", eva_optax.eva_foof, eva_optax.EVA_FOOF_STATISTICS),
  Spec(  # the extension's scaling: V without 1/γ, normalised by sqrt(Σ⟨V, Ĝ⟩), no KL clip
    "eva-kln",
    "Eva (KL norm.)",
    eva_optax.eva,
    eva_optax.EVA_STATISTICS,
    extra=(("scaling", "kl_normalise"),),
  ),
  Spec(  # the authors' momentum (vshampoo.py): buf ← μ²·buf + (1+μ)·d, W ← W − η·buf
    "eva-s", "Eva-s", eva_optax.eva_shampoo, extra=(("nesterov", "authors"),)
  ),
  Spec(
    "kfac",
    "K-FAC",
    eva_optax.kfac,
    eva_optax.KFAC_STATISTICS,
    extra=(("stats_every", 10), ("inverse_every", 10)),
  ),
  Spec(  # the paper's K-FAC baseline: their kfac.py at table 1, batch-cifar10.sh's settings
    "kfac-authors",
    "K-FAC (authors')",
    eva_optax.kfac,
    eva_optax.KFAC_STATISTICS,
    extra=(
      ("stats_every", 10),
      ("inverse_every", 10),
      ("diag_blocks", 4),
      ("kl_clip", 0.001),
      ("damp_stored_factors", True),
    ),
    capture_options=(("factor_rows", "samples"),),
  ),
  Spec(
    "foof",
    "FOOF",
    eva_optax.foof,
    eva_optax.FOOF_STATISTICS,
    extra=(("stats_every", 10), ("inverse_every", 10)),
  ),
  Spec(  # the authors' Shampoo (shampoo.py): their momentum, OIHW grouping, λW twice on biases,
    # their ridge ε·λ_max·I added into the statistics (ε = 1e-12, statistics from εI)
    "shampoo",
    "Shampoo",
    eva_optax.shampoo,
    extra=(
      ("nesterov", "authors"),
      ("dim_order", "torch"),
      ("decay_unpreconditioned_twice", True),
      ("ridge", "authors"),
      ("damping", 1e-12),
    ),
  ),
  Spec("eva+adamw", "Eva+AdamW", eva_adamw, eva_optax.EVA_STATISTICS),
  Spec("eva-f+adamw", "Eva-f+AdamW", eva_foof_adamw, eva_optax.EVA_FOOF_STATISTICS),
  Spec("muon", "Muon", muon, ("input_mean",)),
  Spec("sophia", "Sophia", sophia),
)
SPEC_BY_KEY: dict[str, Spec] = {s.key: s for s in SPECS}


def parse_keys(text: str) -> list[Spec]:
  """``"sgd,eva"`` → the specs, in that order; ``ValueError`` naming unknown keys."""
  wanted = [w.strip().lower() for w in text.split(",") if w.strip()]
  unknown = [w for w in wanted if w not in SPEC_BY_KEY]
  if unknown or not wanted:
    raise ValueError(
      f"--optimizers: unknown {unknown or text!r}; choose from {','.join(SPEC_BY_KEY)}"
    )
  return [SPEC_BY_KEY[w] for w in dict.fromkeys(wanted)]
