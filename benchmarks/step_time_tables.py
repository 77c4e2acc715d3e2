"""The step-time benchmark's tables and files: text and markdown tables of the timed rounds, the
op counts, XLA's cost and the profiles; the merge of several runs; the JSON and markdown
files of a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.step_time_measure import ALL_OPTIMIZERS, OPTIONS
from examples.harness import compiled_ops


def profile_text(results: dict[str, Any]) -> str:
  lines = []
  for name, r in results.items():
    for opt, p in r.get("profile", {}).items():
      if "error" in p:
        lines.append(f"{name} {opt}: profile failed: {p['error']}")
        continue
      kinds = ", ".join(f"{k} {us:.1f}" for k, us in p["by_kind_us_per_step"].items())
      lines += [
        f"{name} {opt}: {p['busy_us_per_step']:.1f} us/step busy ({p['source']},"
        f" {p['steps']} steps traced); by kind (us/step): {kinds}",
        f"  {'us/step':>9} {'share':>6} {'calls':>6}  kind         operation",
      ]
      lines += [
        f"  {t['us_per_step']:>9.1f} {100 * t['share']:>5.1f}% {t['calls_per_step']:>6.1f}"
        f"  {t['kind'] or '-':<12} {t['name'][:90]}"
        for t in p["top"]
      ]
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Reporting.


def _fmt_ratio(x: float) -> str:
  return f"{x:.2f}" if x == x else "n/a"


def _label(opt: str, v: dict[str, Any]) -> str:
  return opt if v["period"] == 1 else f"{opt} (every {v['period']})"


def _failed_lines(r: dict[str, Any], columns: int) -> list[str]:
  if not r.get("errors"):
    return []
  lines = [f"| {opt} | failed |" + " |" * (columns - 2) for opt in r["errors"]]
  return lines + [""] + [f"- `{opt}` failed: `{err}`" for opt, err in r["errors"].items()]


def markdown_tables(results: dict[str, Any]) -> str:
  """One markdown table per timed workload: time and state size, both vs SGD."""
  out = []
  for name, r in results.items():
    if not r.get("timed", True):
      continue
    rounds = f"; {r['rounds']} rounds x {r['steps_per_round']} steps" if "rounds" in r else ""
    lines = [
      f"### {name}: {r['description']} ({r['num_params']:,} parameters{rounds})",
      "",
      "| optimizer | ms/step | ×SGD | state MB | ×SGD state |",
      "|---|---:|---:|---:|---:|",
    ]
    for opt, v in r["variants"].items():
      lines.append(
        f"| {_label(opt, v)} | {v['median_ms']:.2f} | {v['over_sgd']:.2f} "
        f"| {v['state_mb']:.2f} | {_fmt_ratio(v['state_over_sgd'])} |"
      )
    out.append("\n".join(lines + _failed_lines(r, 5)))
  return "\n\n".join(out)


OPS_COLUMNS = (
  ["optimizer", "ops", "×SGD", "extra ops/layer"] + list(compiled_ops.KINDS) + ["compile s"]
)


def _ops_row(opt: str, v: dict[str, Any]) -> list[str]:
  o = v["ops"]
  per_layer = "" if opt == "sgd" else f"{o['extra_per_layer']:+.1f}"
  return (
    [_label(opt, v), str(o["total"]), _fmt_ratio(o["over_sgd"]), per_layer]
    + [str(o["by_kind"].get(k, 0)) for k in compiled_ops.KINDS]
    + [f"{v['compile_s']:.1f}"]
  )


def _ops_caption(name: str, r: dict[str, Any]) -> str:
  layers = r["layers"]
  return (
    f"{name}: {r['description']} ({r['num_params']:,} parameters; {layers['captured']}"
    f" captured layers, {layers['matrices']} parameters of rank >= 2)"
  )


def ops_table(results: dict[str, Any], markdown: bool = False) -> str:
  """Per workload: top-level ops of each compiled step, ×SGD, extra per layer, kinds."""
  out = []
  for name, r in results.items():
    rows = [_ops_row(opt, v) for opt, v in r["variants"].items() if "ops" in v]
    if not rows:
      continue
    if markdown:
      lines = (
        [
          f"### {_ops_caption(name, r)}",
          "",
          "| " + " | ".join(OPS_COLUMNS) + " |",
          "|---|" + "---:|" * (len(OPS_COLUMNS) - 1),
        ]
        + ["| " + " | ".join(row) + " |" for row in rows]
        + _failed_lines(r, len(OPS_COLUMNS))
      )
    else:
      widths = [21, 7, 7, 16] + [12] * len(compiled_ops.KINDS) + [10]
      fmt = lambda row: "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))
      )
      lines = [_ops_caption(name, r), fmt(OPS_COLUMNS), "-" * sum(widths)]
      lines += [fmt(row) for row in rows]
      lines += [
        f"{opt:<21}  FAILED: {err.splitlines()[0][:200]}"
        for opt, err in r.get("errors", {}).items()
      ]
    out.append("\n".join(lines))
  return "\n\n".join(out)


OPS_NOTE = (
  "ops: top-level operations of the compiled step's entry computation (examples.harness.compiled_ops;"
  " kernel launches on a GPU),\ncounted from the compiled object that is timed."
  " extra ops/layer: (ops - SGD's ops) / layers, with layers the\nLayerStats entries of"
  " the capture (optimizers that capture statistics) or the parameters of rank >= 2\n"
  "(plain-gradient ones). fusion .. other: the same ops by kind (dot and convolution"
  " include the\nfusions and library calls around them). compile s: lower + compile."
)


def text_table(results: dict[str, Any]) -> str:
  header = (
    f"{'workload':<19}{'optimizer':<21}{'ms/step':>10}{'xSGD':>8}"
    f"{'paired':>8}{'min':>8}{'CPU':>8}{'IQR':>6}{'state MB':>10}{'xSGD':>7}"
  )
  lines = [header, "-" * len(header)]
  for name, r in results.items():
    if not r.get("timed", True):
      continue
    for opt, v in r["variants"].items():
      iqr = (v["q75_ms"] - v["q25_ms"]) / v["median_ms"]
      lines.append(
        f"{name:<19}{opt:<21}{v['median_ms']:>10.2f}{v['over_sgd']:>8.2f}"
        f"{v['paired_over_sgd']:>8.2f}{v['min_over_sgd']:>8.2f}"
        f"{v['cpu_over_sgd']:>8.2f}{100 * iqr:>5.0f}%"
        f"{v['state_mb']:>10.2f}{_fmt_ratio(v['state_over_sgd']):>7}"
      )
    for opt, err in r.get("errors", {}).items():
      lines.append(f"{name:<19}{opt:<21}  FAILED: {err.splitlines()[0][:200]}")
  return "\n".join(lines)


def robustness_note(results: dict[str, Any]) -> str:
  return (
    "xSGD: ratio of the median wall times per step. Other estimates of the same"
    " ratio:\npaired = median over rounds of the per-round ratio; min = ratio of the"
    " fastest rounds;\nCPU = ratio of the median process CPU time per step (least"
    " sensitive to other load\non the machine). IQR = interquartile range of"
    " the wall times, relative to the median:\nabove ~10% the"
    " machine was contended; rerun, or trust the CPU and paired ratios more.\n"
    "K-FAC, FOOF and Shampoo: per-step averages over whole periods (their inverse"
    " steps included).\nstate MB: eva_optax.state_bytes (10^6 bytes); xSGD state:"
    " relative to SGD with momentum."
  )


def _grid(cols: list[str], rows: list[list[str]], markdown: bool, width: int) -> str:
  if markdown:
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
  widths = [19, 21] + [width] * (len(cols) - 2)
  fmt = lambda row: "".join(
    f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))
  )
  return "\n".join([fmt(cols), "-" * sum(widths)] + [fmt(row) for row in rows])


def breakdown_table(results: dict[str, Any], markdown: bool) -> str:
  cols = [
    "workload",
    "variant",
    "ms/step",
    "vs SGD",
    "extra ms",
    "CPU ms/step",
    "CPU vs SGD",
    "CPU extra ms",
  ]
  rows = []
  for name, r in results.items():
    if not r.get("timed", True):
      continue
    for variant, v in r["variants"].items():
      rows.append(
        [
          name,
          variant,
          f"{v['median_ms']:.2f}",
          f"{v['over_sgd']:.3f}",
          f"{v['extra_ms']:+.2f}",
          f"{v['cpu_median_ms']:.2f}",
          f"{v['cpu_over_sgd']:.3f}",
          f"{v['cpu_extra_ms']:+.2f}",
        ]
      )
  return _grid(cols, rows, markdown, 13)


def cost_table(results: dict[str, Any], markdown: bool) -> str:
  cols = ["workload", "variant", "GFLOP/step", "vs SGD", "MB accessed", "vs SGD", "compile s"]
  rows = []
  for name, r in results.items():
    base = r["variants"]["sgd"]["xla_cost"]
    for variant, v in r["variants"].items():
      c = v["xla_cost"]
      if not c or not base:
        continue
      ratio = lambda key: c[key] / base[key] if base[key] else float("nan")
      rows.append(
        [
          name,
          variant,
          f"{c['gflop']:.3f}",
          f"{ratio('gflop'):.3f}",
          f"{c['mb_accessed']:.1f}",
          f"{ratio('mb_accessed'):.3f}",
          f"{v['compile_s']:.1f}",
        ]
      )
  if not rows:
    return "(no XLA cost analysis on this backend)"
  return _grid(cols, rows, markdown, 12)


def merge_results(payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The results of several runs as one: per workload every variant, a timed one over
  an untimed one, else the first run's; in the order of the registry; the errors of
  the variants no run has; ``timed`` when every variant is."""
  order = {name: i for i, name in enumerate(ALL_OPTIMIZERS)}
  merged: dict[str, Any] = {}
  for payload in payloads:
    for name, r in payload["results"].items():
      m = merged.setdefault(name, {**r, "variants": {}, "errors": {}, "profile": {}})
      for opt, v in r["variants"].items():
        if opt not in m["variants"] or ("median_ms" in v and "median_ms" not in m["variants"][opt]):
          m["variants"][opt] = v
      for opt, p in r.get("profile", {}).items():
        m["profile"].setdefault(opt, p)
  for payload in payloads:
    for name, r in payload["results"].items():
      for opt, err in r.get("errors", {}).items():
        if opt not in merged[name]["variants"]:
          merged[name]["errors"].setdefault(opt, err)
  for m in merged.values():
    m["variants"] = dict(sorted(m["variants"].items(), key=lambda kv: order.get(kv[0], len(order))))
    m["timed"] = all("median_ms" in v for v in m["variants"].values())
  return merged


def device_text(info: dict[str, Any]) -> str:
  return (
    f"{info['devices']} ({info['device_kind']}; {info['cpu'] or info['machine']},"
    f" {info['usable_cpus']} usable of {info['cpu_count']} CPUs)"
  )


def write_outputs(
  args: argparse.Namespace,
  argv: Sequence[str] | None,
  info: dict[str, Any],
  results: dict[str, Any],
  total_s: float,
) -> None:
  """The JSON (``--json``) and markdown (``--md``) files of a run."""
  if args.json:
    payload = {
      "machine": info,
      "settings": {
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "periodic_steps_per_round": "ceil(steps_per_round / period) * period",
        "warmup": args.warmup,
        "seed": args.seed,
        "optimizers": args.optimizer_names,
        "options": dataclasses.asdict(OPTIONS),
        "learning_rate": "the workload's, for every optimizer",
        "data": "synthetic random (step time only)",
        "breakdown": args.breakdown,
        "quick": args.quick,
        "tiny": args.tiny,
        "ops": args.ops,
        "ops_only": args.ops_only,
        "argv": list(sys.argv[1:] if argv is None else argv),
      },
      "results": results,
      "total_s": total_s,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(payload, f, indent=2)
    print(f"\nResults written to {args.json}")
  if args.md:
    v = info["versions"]
    timed = any(r.get("timed", True) for r in results.values())
    header = (
      "# Optimizer step time, op count and state size\n\n"
      f"`benchmarks/step_time.py` on {device_text(info)}, JAX {info['jax_backend']},"
      f" jax {v['jax']}, optax {v['optax']}, flax {v['flax']}, eva_optax"
      f" {v['eva_optax']}."
    )
    if timed:
      rounds = (
        " Interleaved rounds (their number in each table's heading)"
        if args.rounds is None
        else f" {args.rounds} interleaved rounds x {args.steps_per_round} steps per optimizer"
      )
      header += (
        f"{rounds}; K-FAC, FOOF and Shampoo run whole periods per round (10"
        " steps) and report the per-step average, inverse steps included."
        " ms/step: median over rounds of the wall time per step; ×SGD: relative"
        " to SGD with momentum; state MB: `eva_optax.state_bytes` (10^6 bytes)."
        " Synthetic random data (step time only)."
      )
    header += f" Total run time {total_s:.0f}s.\n\n"
    body = markdown_tables(results)
    if args.ops:
      body += (
        "\n\n## Top-level ops of the compiled step\n\n"
        + OPS_NOTE.replace("\n", " ")
        + "\n\n"
        + ops_table(results, markdown=True)
      )
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
      f.write(header + body.strip() + "\n")
    print(f"Markdown written to {args.md}")


def print_tables(args: argparse.Namespace, results: dict[str, Any]) -> None:
  timed = any(r.get("timed", True) for r in results.values())
  if timed and args.breakdown:
    print("\nBreakdown (medians over rounds; extra = minus SGD):")
    print(breakdown_table(results, args.markdown))
  if timed or args.breakdown:
    print(
      "\nXLA's static cost analysis of each compiled step (FLOPs and bytes"
      " accessed as XLA\nestimates them; independent of the load on the machine):"
    )
    print(cost_table(results, args.markdown))
  if args.ops:
    print("\nTop-level ops of each compiled step:\n")
    print(ops_table(results))
    print(OPS_NOTE)
  if timed:
    print()
    print(text_table(results))
    print(robustness_note(results))
  if any(r.get("profile") for r in results.values()):
    print("\nProfile (device time per step by operation):")
    print(profile_text(results))
  if args.markdown:
    print()
    print(markdown_tables(results))
    if args.ops:
      print()
      print(ops_table(results, markdown=True))
