"""A readable account of what each parameter gets: preconditioned or passed through."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eva_optax._src.layers import find_layer_slots
from eva_optax._src.paths import BIAS, KERNEL, flatten_with_paths, path_str
from eva_optax._src.state_entries import holds_layout
from eva_optax._src.statistics import EVA_STATISTICS, LayerStats, PassThrough, layer_entries


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


def _negligible_correction(entry: LayerStats, damping: float, negligible: float) -> str | None:
  """Why Eva's rank-one correction vanishes for this layer, or ``None``.

  Eva's correction removes from the gradient at most the fraction
  ρ = s / (γ + s) of its component along ḡ āᵀ, with s = ‖ā‖²‖ḡ‖². Where ρ is
  below ``negligible`` for every layer of the stack (ḡ ≈ 0 behind a BatchNorm,
  or for attention keys, whose softmax ignores shifts), Eva's update is the
  gradient divided by γ, then the KL factor: SGD with a rescaled step.
  """
  if entry.input_mean is None or entry.output_grad_mean is None:
    return None
  try:
    a2 = np.sum(np.square(np.asarray(entry.input_mean, np.float64)), axis=-1)
    g2 = np.sum(np.square(np.asarray(entry.output_grad_mean, np.float64)), axis=-1)
  except (TypeError, jax.errors.TracerArrayConversionError):
    return None  # traced statistics: nothing to judge
  s = a2 * g2
  rho = float(np.max(s / (damping + s)))
  if not rho < negligible:
    return None
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
      than this fraction of the gradient (ρ = s / (γ + s), s = ‖ā‖²‖ḡ‖²) says
      so in its row: Eva then reduces to the gradient / γ times the KL factor
      there (ḡ ≈ 0 for a Conv followed by BatchNorm, or for attention keys).

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
          if slot.readings and holds_layout(slot, entry.layout, EVA_STATISTICS):
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
