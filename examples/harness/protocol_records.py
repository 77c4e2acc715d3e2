"""The tuning protocol's record: ``protocol.md`` and ``protocol.json`` written (:func:`write`),
and a recorded tuning read back for more seeds (:func:`recorded_tuning`, which refuses one
tuned with other settings), from one record or several (:func:`merged_records`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol_search import Protocol, RecordMismatch, Search, validation_target
from .protocol_tables import budget_table, final_table, tuning_tables

from . import report, targets
from .curvature import curvature_table
from .optimizers import Spec
from .records import dumps, jsonable
from .training import Task

if TYPE_CHECKING:  # annotations only: the protocol module imports this one
  from .protocol import Outcome


# The settings of part 1: a recorded tuning stands for this protocol's only where they agree.
TUNING_FIELDS = (
  "lr_points",
  "lr_step",
  "max_extensions",
  "damping_factors",
  "kl_clip_factors",
  "kl_clip_for",
  "tune_fraction",
  "validation_fraction",
  "tune_seed",
)


def recorded_tuning(
  document: dict[str, Any],
  specs: Sequence[Spec],
  protocol: Protocol,
  higher_is_better: bool,
  steps: int,
  budget_steps: int | None = None,
) -> dict[str, Search]:
  """Part 1 as an earlier run recorded it (``document``: its ``protocol.json``), so that
  the final runs can take other seeds without tuning again. Raises RecordMismatch, naming
  what differs, when the record was tuned with other settings (:data:`TUNING_FIELDS`,
  the steps of a tuning run, ``budget_steps`` those of a confirmation run) or lacks an
  optimizer of ``specs``.

  The confirmation stage is read as recorded, whatever this protocol's ``confirm_top``: a
  record with it gives its confirmed choice (nothing is rerun), one without it (written
  before the stage existed, or with ``confirm_top`` 0) its short-budget choice, as
  before; :func:`confirmation_note` says which."""
  recorded = document["protocol"]
  for name in TUNING_FIELDS:
    mine = jsonable(getattr(protocol, name))
    if recorded.get(name) != mine:
      raise RecordMismatch(
        f"the recorded tuning has {name} {recorded.get(name)}, this protocol {mine}"
      )
  by_key = {t["key"]: t for t in document["tuning"].values()}
  searches = {}
  for spec in specs:
    if spec.key not in by_key:
      raise RecordMismatch(
        f"the recorded tuning has no {spec.name} (it has {', '.join(sorted(by_key))})"
      )
    if by_key[spec.key]["steps"] != steps:
      raise RecordMismatch(
        f"the recorded tuning ran {by_key[spec.key]['steps']} steps "
        f"per point, this budget's {steps}"
      )
    confirming = [t for t in by_key[spec.key]["trials"] if t.get("confirmation")]
    if budget_steps is not None and any(t["steps"] != budget_steps for t in confirming):
      raise RecordMismatch(
        f"the recorded confirmation of {spec.name} ran "
        f"{sorted({t['steps'] for t in confirming})} steps, this budget's {budget_steps}"
      )
    searches[spec.key] = Search.recorded(spec, by_key[spec.key], protocol, higher_is_better)
  return searches


def merged_records(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One record of the tunings of several ``protocol.json`` documents, each optimizer's
  from the one record that tuned it, so that a long tuning splits into groups of
  optimizers (run side by side or in different sessions). Raises RecordMismatch where the
  records were tuned with other settings of part 1 (:data:`TUNING_FIELDS`) or two of them
  tuned the same optimizer."""
  first, *others = documents
  tuning = dict(first["tuning"])
  for document in others:
    for name in TUNING_FIELDS:
      theirs, mine = document["protocol"].get(name), first["protocol"].get(name)
      if theirs != mine:
        raise RecordMismatch(f"the recorded tunings differ in {name}: {mine} and {theirs}")
    for optimizer, record in document["tuning"].items():
      if optimizer in tuning:
        raise RecordMismatch(f"two of the recorded tunings tuned {optimizer}")
      tuning[optimizer] = record
  return {**first, "tuning": tuning}


def confirmation_note(searches: dict[str, Search], recorded: bool) -> str:
  """One sentence on the confirmation stage of ``searches`` (for protocol.md)."""
  confirmed = [s.spec.name for s in searches.values() if s.confirmations()]
  if not confirmed:
    return (
      "The recorded tuning had no confirmation stage: each choice is the short-budget best."
      if recorded
      else "No confirmation stage (confirm_top 0, or the short budget is the whole one)."
    )
  top = sorted({s.confirm_top for s in searches.values() if s.confirmations()})
  return (
    f"After each grid, its {' or '.join(map(str, top))} best points by the short-budget "
    "score ran again over the whole budget on the validation split, and the best there "
    "was chosen (the confirmation"
    + (", as recorded, not run again" if recorded else "")
    + ")."
    + (
      f" Without it: {', '.join(sorted(set(searches) - set(confirmed)))}."
      if len(confirmed) < len(searches)
      else ""
    )
  )


def write(
  outcome: Outcome,
  task: Task,
  protocol: Protocol,
  out: Path,
  *,
  title: str,
  epochs: int,
  window: int,
  tune_steps: int,
  settings: dict[str, Any],
) -> Path:
  """``protocol.md`` and ``protocol.json`` into ``out``, the per-seed reports below it."""
  out.mkdir(parents=True, exist_ok=True)
  target = task.target
  for seed, results in zip(protocol.seeds, outcome.runs):
    value = targets.set_times_to_target(results, target, window)
    report.write_all(
      results,
      out / f"seed{seed}",
      f"{title}, seed {seed}",
      target,
      value,
      {**settings, "seed": seed},
      window=window,
      labels=task.metric_labels,
    )
  scored_by = validation_target(target)
  info = report.machine_info()
  md = [
    f"# {title}: the tuning protocol\n",
    f"Tuning on {protocol.validation_fraction:.0%} of the training set held out, "
    f"{protocol.tune_fraction:.0%} of the budget, seed {protocol.tune_seed}"
    + (
      f" (as recorded in `{settings['tuning_from']}`, not run again)"
      if settings.get("tuning_from")
      else ""
    )
    + "; then "
    f"{epochs} epoch{'s' * (epochs != 1)} ({epochs * task.steps_per_epoch} steps) on the "
    "whole training set, "
    f"seeds {', '.join(map(str, protocol.seeds))}, interleaved.\n",
    "## Tuning\n",
    confirmation_note(outcome.searches, outcome.recorded) + "\n",
    tuning_tables(outcome.searches, scored_by, tune_steps),
  ]
  if outcome.rows:
    md += [
      "## Full budget\n",
      f"Medians over seeds [min–max]. SGD's final quality: its "
      f"{targets.quality_definition(target, window)} in the same seed.\n",
      final_table(outcome.summary, outcome.rows, target, window, outcome.sgd_value),
    ]
    curvature = curvature_table([r for results in outcome.runs for r in results])
    if curvature:
      md += ["## Does the curvature act?\n", "Over the final runs, every seed.\n", curvature]
  else:
    md.append(
      "The tuning alone (`--tune-only`): the final runs take it from this record "
      "(`--tuning-from` this `protocol.json`).\n"
    )
  if outcome.budgets:
    seeds = ", ".join(map(str, protocol.seeds_for_budgets))
    md += [
      "## Budget to quality\n",
      "A whole schedule over each fraction of the budget, the tuned values, seeds "
      f"{seeds}; medians over seeds [min–max]. The shortest budget is the smallest whose "
      "final quality reaches SGD's at the whole budget in the same seed; the crossing "
      "is the first step of the whole-budget run at that quality.\n",
      budget_table(outcome.budgets, target, window),
    ]
  md.append(
    f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    + ".\n"
  )
  (out / "protocol.md").write_text("\n".join(md))
  document = {
    "title": title,
    "protocol": asdict(protocol),
    "settings": settings,
    "machine": info,
    "target": {
      **asdict(target),
      "definition": targets.quality_definition(target, window),
      "sgd_final": outcome.sgd_value,
    },
    "tuning": {
      s.spec.name: {
        "key": key,
        "grids": s.grids,
        "chosen": s.chosen(),
        "score": s.best.score,
        "scored_by": asdict(scored_by),
        "score_steps": s.best.steps,
        "steps": tune_steps,
        "confirm_top": s.confirm_top,
        "confirmation": s.confirmations(),
        "runs": s.runs(),
        "trials": [
          {
            "stage": t.stage,
            **asdict(t.point),
            "score": t.score,
            "steps": t.steps,
            "confirmation": t.confirmation,
          }
          for t in s.trials
        ],
      }
      for key, s in outcome.searches.items()
    },
    "rows": [
      {"name": r.name, "key": r.spec.key, "variant": r.variant, **asdict(r.point)}
      for r in outcome.rows
    ],
    "summary": outcome.summary,
    "budgets": outcome.budgets,
  }
  (out / "protocol.json").write_text(dumps(document))
  return out / "protocol.md"
