"""The tuning protocol's markdown tables: the tuning grids, the final runs and the budget to
quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .protocol_search import Search, default_of
from .protocol_summary import spread

from . import targets
from .training import Target

if TYPE_CHECKING:  # annotations only: the protocol module imports this one
  from .protocol import Row


def _g(v: float | None) -> str:
  return "–" if v is None else f"{v:g}"


def _confirmation_cell(search: Search) -> str:
  """Each confirmed stage: the short-budget choice → the confirmed one, or "kept"."""
  cells = []
  for stage, c in search.confirmations().items():
    default = None if stage == "lr" else default_of(search.spec, stage)
    short, chosen = (
      c[k][stage] if c[k][stage] is not None else default for k in ("short_choice", "chosen")
    )
    if c["changed"]:
      cells.append(f"{stage} {_g(short)} → {_g(chosen)}")
    else:
      cells.append(f"{stage} {_g(chosen)} kept")
  return "; ".join(cells) or "–"


def tuning_tables(searches: dict[str, Search], scored_by: Target, steps: int) -> str:
  """The grids, the chosen values, the confirmation, the tuning runs' count and steps, and
  every trial's validation score."""
  metric = scored_by.metric.partition("_")[2]
  runs = [s.runs() for s in searches.values()]
  confirm_steps = {t.steps for s in searches.values() for t in s.trials if t.confirmation}
  lines = [
    f"Scored by the validation {metric} ({'higher' if scored_by.higher_is_better else 'lower'}"
    f" is better) after a whole schedule of {steps} steps"
    + (
      f", the confirmation's of {', '.join(map(str, sorted(confirm_steps)))} steps"
      if confirm_steps
      else ""
    )
    + f". Tuning runs: {sum(r['count'] for r in runs)}, {sum(r['steps'] for r in runs)} steps "
    f"in all, the confirmation's {sum(r['confirmation_count'] for r in runs)} runs and "
    f"{sum(r['confirmation_steps'] for r in runs)} steps among them.\n",
    "| optimizer | lr grid | damping grid | kl_clip grid | chosen lr | chosen damping "
    f"| chosen kl_clip | validation {metric} | confirmation (short → whole budget) "
    "| tuning runs (steps) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s, r in zip(searches.values(), runs):
    c = s.chosen()
    grid = lambda k: ", ".join(f"{v:g}" for v in s.grids[k]) if k in s.grids else "–"
    lines.append(
      f"| {s.spec.name} | {grid('lr')} | {grid('damping')} | {grid('kl_clip')} "
      f"| {_g(c['lr'])} | {_g(c['damping'])} | {_g(c['kl_clip'])} "
      f"| {s.best.score:.5g} | {_confirmation_cell(s)} | {r['count']} ({r['steps']}) |"
    )
  lines += [
    "",
    f"| optimizer | stage | setting | steps | validation {metric} |",
    "|---|---|---|---|---|",
  ]
  for s in searches.values():
    best = s.best
    for t in s.trials:
      mark = " (chosen)" if t is best else ""
      stage = f"{t.stage}, confirmation" if t.confirmation else t.stage
      lines.append(
        f"| {s.spec.name} | {stage} | {t.point.label()}{mark} | {_g(t.steps)} | {t.score:.5g} |"
      )
  return "\n".join(lines) + "\n"


def final_table(
  summary: dict[str, Any],
  rows: Sequence[Row],
  target: Target,
  window: int,
  sgd_value: dict[str, float] | None,
) -> str:
  """One row per setting: medians over seeds [min–max]."""
  what = targets.quality_definition(target, window)
  tv = spread(sgd_value, ".5g")
  head = [
    "optimizer",
    "lr",
    "damping",
    "kl_clip",
    f"final {what}",
    f"steps to SGD's final ({tv})",
    "× SGD's steps",
    "time to it (s)",
    "× SGD's time",
    "reached",
    "s/epoch",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    s = summary[row.name]
    p = row.point
    damping = p.damping if p.damping is not None else default_of(row.spec, "damping")
    kl_clip = p.kl_clip if p.kl_clip is not None else default_of(row.spec, "kl_clip")
    lines.append(
      "| "
      + " | ".join(
        [
          row.name,
          f"{p.lr:g}",
          _g(damping),
          _g(kl_clip),
          spread(s["final"], ".5g"),
          spread(s["steps_to_target"], ".0f"),
          spread(s["steps_ratio"], ".2f"),
          spread(s["time_to_target_s"], ".1f"),
          spread(s["time_ratio"], ".2f"),
          f"{s['reached']}/{s['seeds']}",
          spread(s["seconds_per_epoch"], ".1f"),
        ]
      )
      + " |"
    )
  return "\n".join(lines) + "\n"


def budget_table(budgets: dict[str, Any], target: Target, window: int) -> str:
  """Part 3: final quality per budget, the shortest budget reaching SGD's whole-budget
  quality, and beside it part 2's crossing measure."""
  fractions = list(next(iter(budgets.values()))["quality"])
  what = targets.quality_definition(target, window)
  head = (
    ["optimizer"]
    + [
      f"{what} at {float(b):.0%} of the budget" if i == 0 else f"at {float(b):.0%}"
      for i, b in enumerate(fractions)
    ]
    + [
      "shortest budget at SGD's whole-budget quality",
      "its steps / SGD's",
      "its time / SGD's",
      "reached",
      "crossing: steps / SGD's",
      "crossing: time / SGD's",
    ]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in budgets.items():
    lines.append(
      "| "
      + " | ".join(
        [name]
        + [spread(row["quality"][b], ".5g") for b in fractions]
        + [
          spread(row["budget"], ".0%"),
          spread(row["steps_ratio"], ".2f"),
          spread(row["time_ratio"], ".2f"),
          f"{row['reached']}/{row['seeds']}",
          spread(row.get("crossing_steps_ratio"), ".2f"),
          spread(row.get("crossing_time_ratio"), ".2f"),
        ]
      )
      + " |"
    )
  return "\n".join(lines) + "\n"
