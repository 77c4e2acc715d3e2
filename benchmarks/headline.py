"""The headline: every workload's tuning protocol, read against SGD's and AdamW's quality.

Reads the results of ``python -m benchmarks.protocol`` (``protocol.json`` and the per-seed
``seed<n>/metrics.json`` in ``benchmarks/results/protocol/<workload>/``) and reports, per
workload and optimizer, medians over seeds with the spread [min–max]:

- **to SGD's final quality**: the steps and the training seconds until the optimizer first
  reaches SGD's final quality of the same seed, as ratios to SGD's own (the crossing);
- **to AdamW's final quality**: the same against AdamW's final quality and AdamW's own
  steps and seconds to it;
- **the shortest whole schedule** (25, 50, 75 or 100 % of the budget) whose final quality
  reaches SGD's whole-budget quality, and its time as a ratio to SGD's whole budget;
- Eva's time to SGD's quality over K-FAC's and Shampoo's (the paper's comparisons);
- in ``headline.md``, where Eva's rank-one correction is negligible over the final runs
  (:func:`examples.harness.curvature.curvature_table`, from each run's record).

"Final quality" has one definition per workload, printed in the table header
(:func:`examples.harness.targets.quality_definition`): the mean of the last 10 step losses
for a training-loss target, the last evaluation for a test metric. A run that never
reaches a reference counts as "not reached": its medians are over the seeds that did and
the tables say how many.

Writes ``headline.md`` and ``headline.json`` into ``--out`` (default
``benchmarks/results``); with ``--readme`` the headline table replaces the text between
``<!-- headline:start -->`` and ``<!-- headline:end -->`` in that file.

Usage::

    python -m benchmarks.headline --readme docs/results.md
    python -m benchmarks.headline --results /tmp/protocols --out /tmp
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import readme
from benchmarks.convergence import WORKLOADS
from examples.harness import targets
from examples.harness.curvature import curvature_table
from examples.harness.optimizers import SPEC_BY_KEY
from examples.harness.protocol_search import default_of
from examples.harness.protocol_summary import ratios_to, spread, stats
from examples.harness.records import dumps, from_json
from examples.harness.training import Result, Target

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD_ORDER = ("autoencoder", "classifier", "char_lm")


@dataclass
class Protocol:
  """One workload's protocol results, as :func:`load` reads them back."""

  workload: str
  document: dict[str, Any]  # protocol.json
  runs: list[list[Result]]  # per seed, the final runs (SGD first)
  target: Target
  window: int

  @property
  def title(self) -> str:
    """The workload's name without a budget (the tables give the budget)."""
    known = WORKLOADS.get(self.workload)
    return known.subject if known and known.subject else self.document["title"]

  @property
  def definition(self) -> str:
    return targets.quality_definition(self.target, self.window)

  def names(self) -> list[str]:
    return [r.name for r in self.runs[0]]


def load(directory: Path) -> Protocol:
  """``protocol.json`` and the final runs of every seed below ``directory``."""
  document = from_json(json.loads((directory / "protocol.json").read_text()))
  target = Target(document["target"]["metric"], document["target"]["higher_is_better"])
  runs = []
  for seed in document["protocol"]["seeds"]:
    metrics = from_json(json.loads((directory / f"seed{seed}" / "metrics.json").read_text()))
    runs.append([Result(**r) for r in metrics["optimizers"].values()])
  window = int(document["settings"].get("reach_window", 10))
  return Protocol(directory.name, document, runs, target, window)


def against(p: Protocol, reference: str) -> dict[str, dict[str, Any]]:
  """Per optimizer: steps and seconds to ``reference``'s final quality in the same seed,
  as ratios to the reference's own (:func:`examples.harness.protocol.ratios_to`)."""
  return ratios_to(p.runs, reference, p.target, p.window)


def time_over(p: Protocol, name: str, other: str) -> dict[str, float] | None:
  """``name``'s seconds to SGD's final quality over ``other``'s, per seed (medians
  [spread]; None: one of them is not in the runs, or never reached it)."""
  ratios = []
  for results in p.runs:
    by_name = {r.name: r for r in results}
    if name not in by_name or other not in by_name:
      return None
    value = targets.final_quality(by_name["SGD"], p.target, p.window)
    mine = targets.reach(by_name[name], p.target, value, p.window)
    them = targets.reach(by_name[other], p.target, value, p.window)
    ratios.append(mine[1] / them[1] if mine and them and them[1] else None)
  return stats(ratios)


def _spread(s: dict[str, float] | None, fmt: str = ".2f") -> str:
  return spread(s, fmt, missing="not reached")


def _reached(row: dict[str, Any], who: str = "") -> str:
  """`` (n of m)`` where ``row`` reached its reference in only n of m seeds."""
  if row["reached"] == row["seeds"]:
    return ""
  return f" ({who + ' reached it in ' if who else ''}{row['reached']} of {row['seeds']})"


def _budget(p: Protocol, name: str) -> str:
  row = p.document.get("budgets", {}).get(name)
  if not row:
    return "–"
  if row["budget"] is None:
    return "none"
  return f"{row['budget']['median']:.0%} ({_spread(row['time_ratio'])}× SGD's time)" + (
    "" if row["reached"] == row["seeds"] else f", {row['reached']} of {row['seeds']}"
  )


def _final(p: Protocol, name: str) -> dict[str, float] | None:
  return stats(
    [
      targets.final_quality(next(r for r in results if r.name == name), p.target, p.window)
      for results in p.runs
    ]
  )


def budget_words(p: Protocol) -> str:
  s = p.document["settings"]
  steps = p.runs[0][0].budget_steps
  return f"{s['epochs']} epoch{'s' * (s['epochs'] != 1)}, {steps} steps"


# The headline's rows: Eva tuned by the protocol, and Eva with the paper's recipe against
# the baselines run the same way (K-FAC "as published" where the protocol ran it); the
# authors' K-FAC against tuned Eva only (it has no "as published" row).
HEADLINE_ROWS = (
  ("Eva", "tuned", "K-FAC", "Shampoo", "K-FAC (authors')"),
  ("Eva (as published)", "as published", "K-FAC (as published)", "Shampoo", None),
)


def headline_table(protocols: Sequence[Protocol]) -> str:
  """Per workload, a line saying what was run and a table with one column per Eva variant
  (tuned, as published) and one row per measure: against SGD's final quality, against the
  baselines, against AdamW's final quality. Three columns, so that it reads on a page."""
  blocks = []
  for p in protocols:
    sgd = against(p, "SGD")
    adamw = against(p, "AdamW") if "AdamW" in p.names() else {}
    rows = [r for r in HEADLINE_ROWS if r[0] in sgd]
    if not rows:
      continue
    seeds = f"{len(p.runs)} seed{'s' * (len(p.runs) != 1)}"
    lines = [
      f"**{p.title}** ({budget_words(p)}, {seeds}); SGD's final quality, {p.definition}: "
      f"{_spread(_final(p, 'SGD'), '.4g')}.\n",
      "| | " + " | ".join(f"Eva {variant} ({_knobs(p, eva)})" for eva, variant, *_ in rows) + " |",
      "|---|" + "---:|" * len(rows),
    ]

    def measure(label, cell):
      lines.append(f"| {label} | " + " | ".join(cell(*r) for r in rows) + " |")

    def baseline(eva, other, who):
      if other is None or other not in sgd:
        return "–"
      return _spread(time_over(p, eva, other)) + _reached(sgd[other], who)

    def to_adamw(eva, key):
      row = adamw.get(eva)
      return _spread(row[key]) + _reached(row) if row else "–"

    measure(
      "steps to SGD's final, / SGD's",
      lambda e, *_: _spread(sgd[e]["steps_ratio"]) + _reached(sgd[e]),
    )
    measure(
      "time to SGD's final, / SGD's", lambda e, *_: _spread(sgd[e]["time_ratio"]) + _reached(sgd[e])
    )
    measure("shortest whole schedule that gets there", lambda e, *_: _budget(p, e))
    measure("time to SGD's final, / K-FAC's", lambda e, v, k, s, a: baseline(e, k, "K-FAC"))
    if any(r[4] in sgd for r in rows):
      measure(
        "time to SGD's final, / the authors' K-FAC's",
        lambda e, v, k, s, a: baseline(e, a, "the authors' K-FAC"),
      )
    measure("time to SGD's final, / Shampoo's", lambda e, v, k, s, a: baseline(e, s, "Shampoo"))
    measure("steps to AdamW's final, / AdamW's", lambda e, *_: to_adamw(e, "steps_ratio"))
    measure("time to AdamW's final, / AdamW's", lambda e, *_: to_adamw(e, "time_ratio"))
    lines += ["", member_table(p, sgd, adamw)]
    blocks.append("\n".join(lines))
  return "\n".join(blocks)


def member_table(
  p: Protocol, sgd: dict[str, dict[str, Any]], adamw: dict[str, dict[str, Any]]
) -> str:
  """One row per tuned optimizer (the "as published" rows left to :func:`optimizer_table`):
  its time to SGD's and to AdamW's final quality over theirs (``sgd``, ``adamw``: the
  workload's :func:`against`, ``{}`` without AdamW), and its final quality, so that every
  member of the family reads against the baselines in one short table."""
  lines = [
    f"| tuned | time to SGD's final / SGD's | time to AdamW's final / AdamW's | final {p.definition} |",
    "|---|---:|---:|---:|",
  ]
  for name in p.names():
    if name not in p.document["tuning"]:
      continue
    to_adamw = _spread(adamw[name]["time_ratio"]) + _reached(adamw[name]) if adamw else "–"
    lines.append(
      f"| {name} | {_spread(sgd[name]['time_ratio']) + _reached(sgd[name])} | {to_adamw} |"
      f" {_spread(_final(p, name), '.4g')} |"
    )
  return "\n".join(lines) + "\n"


def _knobs(p: Protocol, name: str) -> str:
  """``lr, damping, kl_clip`` of a row: the chosen values, or the defaults spelled out."""
  chosen = p.document["tuning"].get(name, {}).get("chosen")
  if chosen is None:  # an "as published" row: its lr, the constructor's defaults
    row = next(r for r in p.document["rows"] if r["name"] == name)
    spec = SPEC_BY_KEY[row["key"]]
    chosen = {
      "lr": row["lr"],
      **{
        k: row.get(k) if row.get(k) is not None else default_of(spec, k)
        for k in ("damping", "kl_clip")
      },
    }
  return (
    ", ".join(f"{chosen[k]:g}" for k in ("lr", "damping", "kl_clip") if chosen.get(k) is not None)
    or "–"
  )


def optimizer_table(p: Protocol) -> str:
  """Every row of one workload's final runs against SGD's and AdamW's final quality."""
  sgd = against(p, "SGD")
  adamw = against(p, "AdamW") if "AdamW" in p.names() else None
  head = [
    "optimizer",
    "lr, damping, kl_clip",
    f"final {p.definition}",
    "to SGD's final: steps / SGD's",
    "time / SGD's",
    "reached",
    "shortest whole schedule at SGD's quality",
  ]
  if adamw:
    head += ["to AdamW's final: steps / AdamW's", "time / AdamW's", "reached"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in p.names():
    cells = [
      name,
      _knobs(p, name),
      _spread(_final(p, name), ".5g"),
      _spread(sgd[name]["steps_ratio"]),
      _spread(sgd[name]["time_ratio"]),
      f"{sgd[name]['reached']}/{sgd[name]['seeds']}",
      _budget(p, name),
    ]
    if adamw:
      cells += [
        _spread(adamw[name]["steps_ratio"]),
        _spread(adamw[name]["time_ratio"]),
        f"{adamw[name]['reached']}/{adamw[name]['seeds']}",
      ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def command_of(p: Protocol) -> str:
  return p.document["settings"].get("command", "python -m benchmarks.protocol")


def render(protocols: Sequence[Protocol]) -> tuple[str, str]:
  """(the headline block of docs/results.md, the whole ``headline.md``)."""
  info = protocols[0].document["machine"]
  machine = (
    f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
    + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    + "."
  )
  commands = "; ".join(f"`{command_of(p)}`" for p in protocols)
  block = (
    headline_table(protocols) + "\nMedians over seeds [min–max]; ratios below 1 "
    "favour Eva. " + machine + f" Commands: {commands}, then "
    "`python -m benchmarks.headline --readme docs/results.md`.\n"
  )
  md = ["# Headline: time to quality, every optimizer tuned alike\n", block]
  for p in protocols:
    md += [
      f"## {p.title}\n",
      f"Budget {budget_words(p)}; seeds {len(p.runs)}; "
      f"final quality = {p.definition}. Command: `{command_of(p)}`. Grids, every "
      f"trial and the per-seed plots: `benchmarks/results/protocol/{p.workload}/`.\n",
      optimizer_table(p),
    ]
    curvature = curvature_table([r for results in p.runs for r in results])
    md += [curvature] if curvature else []
  return block, "\n".join(md)


def summary(protocols: Sequence[Protocol]) -> dict[str, Any]:
  out = {}
  for p in protocols:
    out[p.workload] = {
      "title": p.title,
      "definition": p.definition,
      "budget": budget_words(p),
      "command": command_of(p),
      "seeds": len(p.runs),
      "sgd_final": _final(p, "SGD"),
      "against_sgd": against(p, "SGD"),
      "against_adamw": against(p, "AdamW") if "AdamW" in p.names() else None,
      "eva_over_kfac": time_over(p, "Eva", "K-FAC"),
      "eva_over_shampoo": time_over(p, "Eva", "Shampoo"),
    }
  return out


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.headline", description=__doc__.split("\n\n")[0]
  )
  p.add_argument(
    "--results",
    default=str(ROOT / "benchmarks" / "results" / "protocol"),
    help="directory of the protocols' workload directories",
  )
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  p.add_argument("--readme", default=None, help="file whose headline block to replace")
  args = p.parse_args(argv)
  root = Path(args.results)
  found = (
    [d for d in sorted(root.iterdir()) if (d / "protocol.json").is_file()] if root.is_dir() else []
  )
  if not found:
    raise SystemExit(f"no protocol results under {root}: run python -m benchmarks.protocol")
  found.sort(
    key=lambda d: (
      WORKLOAD_ORDER.index(d.name) if d.name in WORKLOAD_ORDER else len(WORKLOAD_ORDER),
      d.name,
    )
  )
  protocols = [load(d) for d in found]
  block, md = render(protocols)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "headline.md").write_text(md)
  (out / "headline.json").write_text(dumps(summary(protocols)))
  if args.readme:
    readme.update(Path(args.readme), "headline", block)
  print(md)
  return md


if __name__ == "__main__":
  main()
