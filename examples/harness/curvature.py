"""Does the curvature act? Where Eva's rank-one correction is negligible, over a run.

Eva preconditions a layer's gradient with V = (Ĝ − ḡᵀĜâ/(‖â‖²‖ḡ‖² + γ) · ḡâᵀ)/γ and Eva-f
with V = Ĝ − (Ĝâ)âᵀ/(‖â‖² + γ) (â = [ā, 1] with a bias). Where ‖â‖²‖ḡ‖² (Eva) or ‖â‖²
(Eva-f) is far below γ the correction vanishes, and the layer gets the gradient / γ (then
the KL factor): SGD at a rescaled step. :func:`eva_optax.negligible_fraction` measures on
how many layers (and parameters) the correction removes less than 10⁻³ of the gradient's
component along the rank-one direction, from the running averages in the optimizer state
(what the last update used). The :class:`~examples.harness.training.Trainer` records it
after the first step (the first batch's statistics at the initial parameters: the
averages take the first statistics as they are) and after ⌈¼⌉, ⌈½⌉ and all of the budget
(:func:`checkpoint_steps`), host-side, off the clock, into ``Result.curvature``
(``metrics.json``):

``{"rules": ["eva"], "layers": L, "parameters": P, "steps": [1, …], "of_layers": [...],
"of_parameters": [...], "largest_ratio": [...]}``

(``largest_ratio``: the largest ρ over the layers, how far the most curved layer is from
the threshold). It stays ``{}`` for optimizers without a rank-one correction (SGD, AdamW,
K-FAC, FOOF, Shampoo, Eva-s, Muon): "not applicable". :func:`curvature_table` is the
report's table.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

import eva_optax

from .optimizers import Options, Spec

#: Eva's and Eva-f's default damping, where neither the options nor the spec give one.
DEFAULT_DAMPING = 0.03


def checkpoint_steps(total_steps: int) -> tuple[int, ...]:
  """The steps after which the fraction is recorded: 1 (initialisation), ⌈T/4⌉, ⌈T/2⌉, T."""
  steps = [1] + [max(1, math.ceil(total_steps * q)) for q in (0.25, 0.5, 1.0)]
  return tuple(sorted(set(steps)))


def damping_of(spec: Spec, options: Options) -> Any:
  """γ as ``spec.build`` gives it: the options' where the constructor takes ``damping``,
  else the spec's fixed one, else the constructor's default (0.03 where it has none)."""
  if options.damping is not None and spec.accepts("damping"):
    return options.damping
  fixed = dict(spec.extra)
  if "damping" in fixed:
    return fixed["damping"]
  parameter = inspect.signature(spec.factory).parameters.get("damping")
  if parameter is None or parameter.default is inspect.Parameter.empty:
    return DEFAULT_DAMPING
  return parameter.default


def record(
  curvature: dict[str, Any], step: int, params: Any, opt_state: Any, layouts: Any, damping: Any
) -> None:
  """Append the fraction at ``step`` to ``curvature`` (left as it is where not applicable)."""
  found = eva_optax.negligible_fraction(params, opt_state, layouts=layouts, damping=damping)
  if found is None:
    return
  curvature.update(rules=list(found.rules), layers=found.layers, parameters=found.parameters)
  largest = max((float(np.max(r)) for r in found.ratios.values()), default=float("nan"))
  for key, value in (
    ("steps", step),
    ("of_layers", found.of_layers),
    ("of_parameters", found.of_parameters),
    ("largest_ratio", largest),
  ):
    curvature.setdefault(key, []).append(value)


def _fraction(v: float) -> str:
  """Two decimals; ``>0.99`` and ``<0.01`` where a fraction short of 1 (above 0) would
  read as 1.00 (0.00)."""
  text = f"{v:.2f}"
  if 0 < v < 1 and text in ("0.00", "1.00"):
    return "<0.01" if text == "0.00" else ">0.99"
  return text


def _fractions(runs: Sequence[list[float]]) -> str:
  """``0.25 / 1.00 / …``: each checkpoint's value, the median over seeds with the range
  where they differ (``1.00 [0.98–1.00]``)."""
  cells = []
  for values in zip(*runs):
    lo, mid, hi = (_fraction(v) for v in (min(values), float(np.median(values)), max(values)))
    cells.append(mid if lo == hi else f"{mid} [{lo}–{hi}]")
  return " / ".join(cells)


def curvature_table(results: Sequence[Any]) -> str:
  """Markdown: per optimizer with a rank-one correction, the fraction of its layers and of
  its parameters where the correction is negligible (ρ < 10⁻³) at each recorded step, and
  the largest ρ at the end; one line naming the optimizers it does not apply to. Results
  of the same name (seeds: the protocol's ``runs``, flattened) share a row, medians
  [min–max]. ``""`` when no result has it."""
  by_name: dict[str, list[Any]] = {}
  for r in results:
    by_name.setdefault(r.name, []).append(r)
  rows = {n: rs for n, rs in by_name.items() if all(getattr(r, "curvature", None) for r in rs)}
  if not rows:
    return ""
  lines = [
    "Does the curvature act? Fraction of the preconditioned layers (and of their parameters)"
    " where the rank-one correction removes less than 10⁻³ of the gradient's component along"
    " it (ρ = ‖â‖²‖ḡ‖²/(‖â‖²‖ḡ‖² + γ) for Eva, ‖â‖²/(‖â‖² + γ) for Eva-f, from the running"
    " averages; `eva_optax.negligible_fraction`), after the first step and at 25, 50 and"
    " 100 % of the budget. Where it is 1, every update is the gradient rescaled (by 1/γ,"
    " then the KL factor): SGD at another step.",
    "",
    "| optimizer | lr | layers (parameters) | after steps | negligible: layers"
    " | negligible: parameters | largest ρ at the end |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, rs in rows.items():
    c = rs[0].curvature
    steps = " / ".join(str(s) for s in c["steps"])
    largest = [r.curvature["largest_ratio"][-1] for r in rs]
    lines.append(
      f"| {name} | {rs[0].lr:g} | {c['layers']} ({c['parameters']}) | {steps} |"
      f" {_fractions([r.curvature['of_layers'] for r in rs])} |"
      f" {_fractions([r.curvature['of_parameters'] for r in rs])} |"
      f" {float(np.median(largest)):.2g} |"
    )
  others = [n for n in by_name if n not in rows]
  if others:
    lines += ["", "Not applicable (no rank-one correction): " + ", ".join(others) + "."]
  return "\n".join(lines) + "\n"
