"""Eva's own knobs, one at a time, around the tuning protocol's choice.

Starts from Eva's values chosen by ``python -m benchmarks.protocol`` on the same workload
(``--protocol``, default ``benchmarks/results/protocol/<workload>/protocol.json``; without
it, the example's learning rate and Eva's defaults) and changes one knob at a time, each
variant a whole run of the budget, interleaved with SGD at its tuned rate (whose final
quality is the target, as in the protocol), on ``--seeds``:

- **scaling**: KL normalisation (the extension's ``scaling='kl_normalise'``, ν =
  1/sqrt(Σ⟨V, Ĝ⟩): every step has KL radius lr², so lr takes the role of sqrt(kl_clip)),
  at lr = sqrt(κ) × (1/√10, 1, √10) with κ the chosen KL clip;
- **kl_clip** × 1/10 and × 10 (the protocol tried × 1/3 and × 3);
- **damping** × 10⁻⁶, 10⁻⁴, 1/10 and 10: Eva's update is V = (Ĝ − s ḡ āᵀ / (‖ā‖²‖ḡ‖²
  + γ)) / γ with s = ḡᵀĜā, so where ‖ā‖²‖ḡ‖² ≪ γ (``eva_optax.describe`` flags such
  layers) it is the gradient / γ, and only a damping near that scale lets the correction
  act;
- **the correction at work**: KL normalisation at lr sqrt(κ)×√10 with the damping × 10⁻⁶
  and × 10⁻⁴ (KL normalisation fixes the step's size whatever γ is, so only the
  direction changes: the correction removes more of the ḡ āᵀ component);
- **stat_decay** 0, 0.5 and 0.95 (the weight of the *old* running averages of ā and ḡ;
  Eva's default 0.05, the authors' 0.95 on the newest batch; 0 keeps only the current
  batch, 0.95 averages over about 20 steps as K-FAC's factors do);
- **passed-through parameters at lr/damping**: Eva returns the parameters outside a layer
  (embeddings, norm scales and offsets) unscaled, so they step at η while its layers, where
  the correction vanishes, step at η/γ times the KL factor; this variant gives them SGD at
  η/γ (``Options.passthrough_scale``, through ``optax.partition``);
- **output layer unpreconditioned** (where the task names one, ``Task.output_layer``: the
  language model's vocabulary head), the authors' convention for transformers: that
  layer gets SGD with the same momentum and weight decay through ``optax.partition``.

Per variant, medians over seeds [min–max]: the final quality, the steps and time to SGD's
final quality as ratios to SGD's. Writes ``knobs.md`` and ``knobs.json`` into ``--out``
(default ``benchmarks/results/knobs/<workload>``) and the per-seed reports below it.

Usage::

    python -m benchmarks.knobs --workload autoencoder --seeds 0,1
    python -m benchmarks.knobs --workload char_lm --seeds 0 -- --epochs 8 --steps-per-epoch 250
    python -m benchmarks.knobs --quick --out /tmp/knobs        # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax

from benchmarks.convergence import WORKLOADS, load_example
from examples.harness import report, targets
from examples.harness.optimizers import SPEC_BY_KEY, Options, has_passthrough
from examples.harness.protocol import Row, final_runs
from examples.harness.protocol_search import Point, default_of, significant
from examples.harness.protocol_summary import spread, summarise
from examples.harness.records import dumps
from examples.harness.training import Task

ROOT = Path(__file__).resolve().parents[1]
EVA = SPEC_BY_KEY["eva"]
# Down to the scale of ‖ā‖²‖ḡ‖² in these models (2e-6 to 1e-23 at initialisation, see
# eva_optax.describe), where Sherman–Morrison's correction to the gradient / γ starts to act.
DAMPING_FACTORS = (1e-6, 1e-4, 0.1, 10.0)


def chosen_points(document: dict[str, Any] | None, task: Task) -> tuple[Point, Point]:
  """(SGD's, Eva's) chosen points of a protocol's ``protocol.json`` (None: the task's
  learning rates, Eva's defaults spelled out)."""
  eva_default = Point(
    task.default_lrs["eva"], default_of(EVA, "damping"), default_of(EVA, "kl_clip")
  )
  if document is None:
    return Point(task.default_lrs["sgd"]), eva_default
  tuning = {t["key"]: t["chosen"] for t in document["tuning"].values()}
  if "sgd" not in tuning or "eva" not in tuning:
    raise SystemExit(
      "the protocol's results tune no SGD or no Eva: run python -m benchmarks.protocol with both"
    )
  eva = tuning["eva"]
  return Point(tuning["sgd"]["lr"]), Point(eva["lr"], eva["damping"], eva["kl_clip"])


def variants(eva: Point, task: Task) -> list[tuple[str, str, Point]]:
  """``(knob, label, point)`` of every variant, the chosen point first."""
  out = [("chosen", "as chosen by the protocol", eva)]
  radius = math.sqrt(eva.kl_clip)
  for f, words in (
    (10**-0.5, "sqrt(kl_clip)/√10"),
    (1.0, "sqrt(kl_clip)"),
    (10**0.5, "sqrt(kl_clip)×√10"),
  ):
    lr = significant(radius * f)
    out.append(
      (
        "scaling",
        f"KL normalisation, lr {lr:g} = {words}",
        Point(lr, eva.damping, eva.kl_clip, (("scaling", "kl_normalise"),)),
      )
    )
  for f in (0.1, 10.0):
    out.append(
      (
        "kl_clip",
        f"kl_clip {significant(eva.kl_clip * f):g} (×{f:g})",
        Point(eva.lr, eva.damping, significant(eva.kl_clip * f)),
      )
    )
  for f in DAMPING_FACTORS:
    out.append(
      (
        "damping",
        f"damping {significant(eva.damping * f):g} (×{f:g})",
        Point(eva.lr, significant(eva.damping * f), eva.kl_clip),
      )
    )
  # The correction at work: KL normalisation (which fixes the step's size whatever γ is)
  # with a damping small enough for ‖ā‖²‖ḡ‖² to count.
  normalised = significant(radius * 10**0.5)
  for f in DAMPING_FACTORS[:2]:
    out.append(
      (
        "correction",
        f"KL normalisation, lr {normalised:g}, damping {significant(eva.damping * f):g} (×{f:g})",
        Point(
          normalised, significant(eva.damping * f), eva.kl_clip, (("scaling", "kl_normalise"),)
        ),
      )
    )
  for decay in (0.0, 0.5, 0.95):
    out.append(
      (
        "stat_decay",
        f"stat_decay {decay:g}",
        Point(eva.lr, eva.damping, eva.kl_clip, (("stat_decay", decay),)),
      )
    )
  # Passed-through parameters (embeddings, norms) step at η while Eva's layers, where the
  # correction vanishes, step at η/γ (then the KL factor): give them η/γ too, with SGD
  # (where the model has any).
  if has_passthrough(task.init(jax.random.PRNGKey(0))[0]):
    out.append(
      (
        "passthrough",
        f"passed-through parameters at lr/damping (×{significant(1 / eva.damping):g}, SGD)",
        Point(
          eva.lr, eva.damping, eva.kl_clip, (("passthrough_scale", significant(1 / eva.damping)),)
        ),
      )
    )
  if task.output_layer:
    out.append(
      (
        "output layer",
        f"{task.output_layer} unpreconditioned (SGD)",
        Point(eva.lr, eva.damping, eva.kl_clip, (("plain_modules", (task.output_layer,)),)),
      )
    )
  return out


def table(
  summary: dict[str, Any],
  knobs: Sequence[tuple[str, str, Point]],
  what: str,
  sgd_value: dict[str, float] | None,
) -> str:
  """SGD's row, then one row per variant: the final quality and the steps and time to
  SGD's final quality as ratios to SGD's (medians [min–max] over seeds)."""
  head = [
    "knob",
    "Eva variant",
    "lr, damping, kl_clip",
    f"final {what}",
    f"steps to SGD's final ({spread(sgd_value, '.5g')}) / SGD's",
    "time / SGD's",
    "reached",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows = [("reference", "SGD", None)] + [(k, f"Eva: {label}", p) for k, label, p in knobs]
  for knob, name, point in rows:
    s = summary[name]
    values = (
      f"{s['lr']:g}" if point is None else f"{point.lr:g}, {point.damping:g}, {point.kl_clip:g}"
    )
    lines.append(
      "| "
      + " | ".join(
        [
          knob,
          name,
          values,
          spread(s["final"], ".5g"),
          spread(s["steps_ratio"], ".2f"),
          spread(s["time_ratio"], ".2f"),
          f"{s['reached']}/{s['seeds']}",
        ]
      )
      + " |"
    )
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.knobs",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--workload", default="autoencoder", choices=sorted(WORKLOADS))
  p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
  p.add_argument(
    "--protocol",
    default=None,
    help="the protocol's protocol.json whose chosen values to start from "
    "(default: the workload's in benchmarks/results/protocol/, if any)",
  )
  p.add_argument("--quick", action="store_true", help="the workload's tiny flags, seed 0")
  p.add_argument("--out", default=None)
  p.add_argument("extra", nargs="*", help="more flags for the example (after --)")
  args = p.parse_args(argv)
  try:
    args.seeds = (0,) if args.quick else tuple(int(s) for s in args.seeds.split(","))
  except ValueError:
    p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
  default = ROOT / "benchmarks" / "results" / "protocol" / args.workload / "protocol.json"
  args.protocol = (
    Path(args.protocol)
    if args.protocol
    else (default if default.is_file() and not args.quick else None)
  )
  args.out = Path(args.out or ROOT / "benchmarks" / "results" / "knobs" / args.workload)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  w = WORKLOADS[args.workload]
  example = load_example(w.name)
  example_args = example.parse_args(list(w.quick if args.quick else w.argv) + args.extra)
  task = example.make_task(example_args)
  document = json.loads(args.protocol.read_text()) if args.protocol else None
  sgd, eva = chosen_points(document, task)
  knobs = variants(eva, task)
  rows = [Row("SGD", SPEC_BY_KEY["sgd"], sgd)] + [
    Row(f"Eva: {label}", EVA, point) for _, label, point in knobs
  ]
  base = Options(example_args.momentum, example_args.weight_decay)
  window = example_args.reach_window
  runs = final_runs(
    task,
    rows,
    args.seeds,
    example_args.epochs,
    base,
    eval_every=example_args.eval_every,
    chunk=example_args.chunk,
    window=window,
  )
  summary = summarise(runs, task.target, window)
  what = targets.quality_definition(task.target, window)
  command = "python -m benchmarks.knobs " + " ".join(argv if argv is not None else sys.argv[1:])
  settings = {k: v for k, v in vars(example_args).items() if k != "specs"}
  for seed, results in zip(args.seeds, runs):
    value = targets.set_times_to_target(results, task.target, window)
    report.write_all(
      results,
      args.out / f"seed{seed}",
      f"{w.subject}: Eva's knobs, seed {seed}",
      task.target,
      value,
      {**settings, "seed": seed, "command": command},
      window=window,
      labels=task.metric_labels,
    )
  info = report.machine_info()
  start = (
    f"the tuning protocol's choice ({args.protocol.relative_to(ROOT)})"
    if args.protocol and args.protocol.is_relative_to(ROOT)
    else f"the tuning protocol's choice ({args.protocol})"
    if args.protocol
    else "the example's learning rate and Eva's defaults"
  )
  md = "\n".join(
    [
      f"# {w.subject}: Eva's knobs, one at a time\n",
      f"From {start}: Eva at lr {eva.lr:g}, damping {eva.damping:g}, kl_clip "
      f"{eva.kl_clip:g}, stat_decay {default_of(EVA, 'stat_decay'):g}; SGD at lr "
      f"{sgd.lr:g} sets the target. {example_args.epochs} epochs "
      f"({runs[0][0].budget_steps} steps), seeds {', '.join(map(str, args.seeds))}, "
      "interleaved; medians over seeds [min–max].\n",
      table(summary, knobs, what, summary["SGD"]["final"]),
      f"Command: `{command}`.\n",
      f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), device {info['device']}; "
      + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
      + ".\n",
    ]
  )
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "knobs.md").write_text(md)
  document_out = {
    "title": w.subject,
    "command": command,
    "machine": info,
    "settings": settings,
    "start": {"sgd": asdict(sgd), "eva": asdict(eva)},
    "variants": [{"knob": k, "label": label, **asdict(p)} for k, label, p in knobs],
    "summary": summary,
  }
  (args.out / "knobs.json").write_text(dumps(document_out))
  print("\n" + md)
  return summary


if __name__ == "__main__":
  main()
