"""A readable account of what each parameter gets: preconditioned or passed through.

:func:`describe` gives one row per parameter; :func:`negligible_fraction` says, from an
optimizer state's running averages, on how many layers (and parameters) the rank-one
correction of Eva or Eva-f is negligible, i.e. where the rule acts as a scaled gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eva_optax._src.eva import ScaleByEvaState
from eva_optax._src.eva_foof import ScaleByEvaFoofState
from eva_optax._src.layers import find_layer_slots
from eva_optax._src.paths import BIAS, KERNEL, flatten_with_paths, path_str
from eva_optax._src.state_entries import (
  flatten_entries,
  holds_layout,
  layout_statistics,
  read_entry,
)
from eva_optax._src.statistics import (
  EVA_STATISTICS,
  INPUT_MEAN,
  OUTPUT_GRAD_MEAN,
  LayerStats,
  PassThrough,
  layer_entries,
  stored_shape,
)

#: The rules with a rank-one correction, by the type of their state.
EVA, EVA_F = "eva", "eva-f"


class ParameterRule(NamedTuple):
  """One row of :func:`describe`: a parameter and the rule applied to it."""

  parameter: str
  shape: tuple[int, ...]
  rule: str
  detail: str


class Description(list):
  """The rows of :func:`describe`; ``str()`` gives the table."""

  def __str__(self) -> str:
    header = ParameterRule("parameter", (), "rule", "detail")
    rows = [header] + list(self)
    cells = [
      (r.parameter, "shape" if r is header else str(tuple(r.shape)), r.rule, r.detail) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = []
    for i, c in enumerate(cells):
      lines.append("  ".join(c[j].ljust(widths[j]) for j in range(3)) + "  " + c[3])
      if i == 0:
        lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    n_pre = sum(r.rule == "preconditioned" for r in self)
    lines.append(f"{n_pre} of {len(self)} parameters preconditioned")
    return "\n".join(lines)

  __repr__ = __str__


def correction_ratio(
  rule: str, a_sq: np.ndarray, g_sq: np.ndarray | None, has_bias: bool, damping: float
) -> np.ndarray:
  """ρ: the largest fraction of the gradient's component along the rank-one
  direction that the rule removes (the rest of the gradient is only divided by γ).

  With ‖â‖² = ‖ā‖² + 1 for a layer with a bias (ā with its trailing 1, as the rules
  use it) and ‖â‖² = ‖ā‖² without:

  * Eva, V = (Ĝ − ḡᵀĜâ / (‖â‖²‖ḡ‖² + γ) · ḡâᵀ)/γ: ρ = s / (s + γ), s = ‖â‖²‖ḡ‖²;
  * Eva-f, V = Ĝ − (Ĝâ)âᵀ / (‖â‖² + γ): ρ = ‖â‖² / (‖â‖² + γ).

  So Eva-f's ρ ≥ 1 / (1 + γ) on every layer with a bias, whatever the statistics.
  Elementwise over ``a_sq`` (and ``g_sq``, Eva's), one value per layer of a stack.
  """
  a_sq = np.asarray(a_sq, np.float64) + (1.0 if has_bias else 0.0)
  s = a_sq * np.asarray(g_sq, np.float64) if rule == EVA else a_sq
  return s / (damping + s)


def _negligible_correction(entry: LayerStats, damping: float, negligible: float) -> str | None:
  """Why Eva's rank-one correction vanishes for this layer, or ``None``.

  Eva's correction removes from the gradient at most the fraction
  ρ = s / (γ + s) of its component along ḡ âᵀ, with s = ‖â‖²‖ḡ‖²
  (:func:`correction_ratio`). Where ρ is below ``negligible`` for every layer of
  the stack (ḡ ≈ 0 behind a BatchNorm, or for attention keys, whose softmax
  ignores shifts), Eva's update is the gradient divided by γ, then the KL
  factor: SGD with a rescaled step.
  """
  if entry.input_mean is None or entry.output_grad_mean is None:
    return None
  try:
    a2 = np.sum(np.square(np.asarray(entry.input_mean, np.float64)), axis=-1)
    g2 = np.sum(np.square(np.asarray(entry.output_grad_mean, np.float64)), axis=-1)
  except (TypeError, jax.errors.TracerArrayConversionError):
    return None  # traced statistics: nothing to judge
  rho = float(np.max(correction_ratio(EVA, a2, g2, entry.has_bias, damping)))
  if not rho < negligible:
    return None
  a2 = a2 + (1.0 if entry.has_bias else 0.0)
  s = a2 * g2
  small = "ḡ" if float(np.max(g2)) <= float(np.max(a2)) else "ā"
  return (
    f"; {small} ≈ 0 (‖ā‖²‖ḡ‖² = {float(np.max(s)):.1e}, γ = {damping:g}): Eva's"
    " correction vanishes here, the update is the gradient / γ times the KL factor"
  )


def describe(
  params: Any,
  stats: Any,
  *,
  layouts: Any = None,
  damping: float = 0.03,
  negligible: float = 1e-3,
) -> Description:
  """Which parameters a layer-wise preconditioner treats, and how.

  Every leaf of ``params`` gets one row: ``preconditioned`` (kernel and bias of a
  captured Dense/DenseGeneral/Conv/Einsum layer, with its matrix shape) or
  ``pass-through`` with the reason (not in a layer; a layer the capture saw but
  does not support; a kernel for which no statistics were captured).

  Args:
    params: the parameter tree given to the optimizer.
    stats: the statistics from :func:`eva_optax.value_and_grad`.
    layouts: as given to the optimizer, if any. A layer whose captured layout
      differs from the one the parameters suggest says so: taken from the
      capture when the optimizer state has room for it (judged for Eva's ā
      and ḡ), else the optimizer needs ``layouts=eva_optax.layouts_of(stats)``.
    damping: Eva's γ, for the check below (default Eva's).
    negligible: a preconditioned layer whose Eva correction can remove less
      than this fraction of the gradient (ρ = s / (γ + s), s = ‖â‖²‖ḡ‖², with
      ‖â‖² = ‖ā‖² + 1 for a layer with a bias: :func:`correction_ratio`) says
      so in its row: Eva then reduces to the gradient / γ times the KL factor
      there (ḡ ≈ 0 for a Conv followed by BatchNorm, or for attention keys).
      :func:`negligible_fraction` counts such layers from an optimizer state.

  Returns:
    A :class:`Description` (a list of :class:`ParameterRule`; print it).
  """
  entries = layer_entries(stats)
  slots = find_layer_slots(params, layouts)
  rows = Description()
  for path, leaf in flatten_with_paths(params):
    module, name = path[:-1], path[-1] if path else ""
    shape = tuple(jnp.shape(leaf))
    entry = entries.get(module)
    slot = slots.get(module)
    if name not in (KERNEL, BIAS) or (slot is None and entry is None):
      rule, detail = "pass-through", "not part of a Dense/DenseGeneral/Conv/Einsum layer"
    elif isinstance(entry, PassThrough):
      rule, detail = "pass-through", f"{entry.kind}: {entry.reason}"
    elif isinstance(entry, LayerStats):
      stack, in_dim, out_dim = entry.layout.dims(slot.kernel_shape if slot else shape)
      bias = " + bias" if entry.has_bias else ""
      stacked = f", stack {stack}" if stack else ""
      rule, detail = "preconditioned", f"{entry.kind}: in {in_dim}{bias}, out {out_dim}{stacked}"
      if name == KERNEL:
        detail += _negligible_correction(entry, damping, negligible) or ""
        if slot is not None and slot.layout != entry.layout:
          if slot.possible_layouts and holds_layout(slot, entry.layout, EVA_STATISTICS):
            detail += "; layout from the capture (the parameters allow several)"
          else:
            detail += (
              "; the optimizer state has no room for this layout (the"
              " parameters suggest another): give the optimizer"
              " layouts=eva_optax.layouts_of(stats)"
            )
    else:
      rule, detail = (
        "pass-through",
        "no statistics captured for this kernel (its module was not called"
        " through the capture, or is not a Dense/DenseGeneral/Conv/Einsum)",
      )
    rows.append(ParameterRule(path_str(path), shape, rule, detail))
  return rows


class NegligibleFraction(NamedTuple):
  """Where the rank-one correction of Eva or Eva-f acts (:func:`negligible_fraction`).

  A layer of a stack (``nn.scan``) counts as one layer. Its parameters are its
  kernel's and bias's entries.

  Attributes:
    rules: the rule of each state found, in the state's order: ``'eva'`` or ``'eva-f'``.
    layers: preconditioned layers.
    negligible_layers: those whose ρ (:func:`correction_ratio`) is below the threshold.
    parameters: the kernel and bias entries of the preconditioned layers.
    negligible_parameters: those of the negligible layers.
    ratios: ρ of every layer, ``{module path: array of the stack's shape}`` (``()``
      for a layer outside a stack), the path's names joined by ``/``.
  """

  rules: tuple[str, ...]
  layers: int
  negligible_layers: int
  parameters: int
  negligible_parameters: int
  ratios: dict[str, np.ndarray]

  @property
  def of_layers(self) -> float:
    """The fraction of layers where the correction is negligible (NaN without layers)."""
    return self.negligible_layers / self.layers if self.layers else float("nan")

  @property
  def of_parameters(self) -> float:
    """The fraction of parameters where the correction is negligible (NaN without layers)."""
    return self.negligible_parameters / self.parameters if self.parameters else float("nan")


def _host(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float64)


def negligible_fraction(
  params: Any,
  opt_state: Any,
  *,
  layouts: Any = None,
  damping: Any = 0.03,
  negligible: float = 1e-3,
) -> NegligibleFraction | None:
  """On how many layers (and parameters) Eva's or Eva-f's correction is negligible.

  Reads the running averages ā and ḡ that the states of
  :func:`eva_optax.scale_by_eva` and :func:`eva_optax.scale_by_eva_foof` hold (found
  wherever they sit in ``opt_state``: ``optax.chain``, ``partition``, …), i.e. the
  statistics the last update used, and for every layer computes ρ, the largest
  fraction of the gradient's component along the rank-one direction that the rule
  removes (:func:`correction_ratio`): for Eva ρ = s/(s + γ) with s = ‖â‖²‖ḡ‖², for
  Eva-f ρ = ‖â‖²/(‖â‖² + γ), â = [ā, 1] for a layer with a bias. Where ρ is below
  ``negligible`` (the threshold :func:`describe` flags rows by), the update of that
  layer is the gradient divided by γ (then the KL factor): SGD at a rescaled step.
  On a model where most layers are, Eva is SGD inside a KL trust region.

  Host-side (the state is copied to the host), not under ``jit``. Before the first
  update the averages are zero, and every layer reads negligible.

  Args:
    params: the parameters given to the optimizer.
    opt_state: the optimizer's state (any optax transformation's).
    layouts: as given to the optimizer, or the captured statistics
      (:func:`eva_optax.layouts_of`); needed where the state keeps a layer's
      averages in a flat buffer (a layout the parameters leave open).
    damping: the rule's γ, a float or a schedule (evaluated at the last update's
      step). Default 0.03, Eva's and Eva-f's default.
    negligible: the threshold on ρ (default 1e-3, :func:`describe`'s).

  Returns:
    A :class:`NegligibleFraction`, or ``None`` when ``opt_state`` holds no Eva or
    Eva-f state (K-FAC, FOOF, Shampoo, Eva-s: no rank-one correction to judge).
  """
  is_rank_one = lambda x: isinstance(x, (ScaleByEvaState, ScaleByEvaFoofState))
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_rank_one) if is_rank_one(s)]
  if not states:
    return None
  slots = find_layer_slots(params, layouts)
  rules, ratios = [], {}
  layers = negligible_layers = parameters = negligible_parameters = 0
  for state in states:
    rule = EVA if isinstance(state, ScaleByEvaState) else EVA_F
    rules.append(rule)
    step = max(int(jax.device_get(state.count)) - 1, 0)
    gamma = float(damping(step)) if callable(damping) else float(damping)
    names = (INPUT_MEAN, OUTPUT_GRAD_MEAN) if rule == EVA else (INPUT_MEAN,)
    trees = {n: flatten_entries(getattr(state, n)) for n in names}
    for path, stored in trees[INPUT_MEAN].items():
      where = f"{rule} state, {path_str(path)}"
      slot = slots.get(path)
      if slot is None:
        raise ValueError(f"{where}: no layer of params at this path (other parameters?)")
      shapes = layout_statistics(slot, slot.layout, names)
      if layouts is None and len(slot.possible_layouts) > 1:
        raise ValueError(
          f"{where}: the parameters leave this layer's layout open (the state keeps"
          f" its averages as a flat buffer of {stored_shape(stored)}): pass layouts="
          " as given to the optimizer, or eva_optax.layouts_of(stats)"
        )
      sq = {
        n: np.sum(np.square(read_entry(_host(trees[n][path]), shapes[n], where)), axis=-1)
        for n in names
      }
      rho = correction_ratio(rule, sq[INPUT_MEAN], sq.get(OUTPUT_GRAD_MEAN), slot.has_bias, gamma)
      stack, in_dim, out_dim = slot.layout.dims(slot.kernel_shape)
      each = in_dim * out_dim + (out_dim if slot.has_bias else 0)
      small = int(np.sum(rho < negligible))
      layers += rho.size
      negligible_layers += small
      parameters += rho.size * each
      negligible_parameters += small * each
      ratios[path_str(path)] = rho
  return NegligibleFraction(
    tuple(rules), layers, negligible_layers, parameters, negligible_parameters, ratios
  )
