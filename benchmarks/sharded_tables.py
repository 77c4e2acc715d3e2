"""The sharded benchmark's tables: the text table of the records and the markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from benchmarks.sharded_config import DEVICE_FLAG, DEVICES, MESHES, OPTIMIZERS, ModelConfig

# ---------------------------------------------------------------------------
# Tables.


def _kb(nbytes: float) -> str:
  return f"{nbytes / 1024:.1f}"


def _signed_kb(nbytes: float) -> str:
  return f"{nbytes / 1024:+.1f}"


def _kinds(record: dict[str, Any]) -> str:
  short = {
    "all-reduce": "AR",
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
  }
  return " ".join(
    f"{short.get(k, k)}{v['count']}" for k, v in record["by_kind"].items() if k != "total"
  )


def measured(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The records of the 8-device meshes and the default model (the main tables), by mesh,
  depth and optimizer."""
  order = lambda r: (
    list(MESHES).index(r["mesh"]),
    r["depth"],
    OPTIMIZERS.index(r["optimizer"]) if r["optimizer"] in OPTIMIZERS else 99,
  )
  return sorted(
    (r for r in records if r["devices"] == DEVICES and r["model"] == asdict(ModelConfig())),
    key=order,
  )


def text_table(records: Sequence[dict[str, Any]]) -> str:
  header = (
    f"{'mesh':>5} {'depth':>5} {'optimizer':>9} {'collectives':>21} {'+count':>6} "
    f"{'kB':>8} {'+kB':>7} {'state kB/dev':>12} {'x logical':>9} {'ops':>5} "
    f"{'ms/step':>8}"
  )
  lines = [header, "-" * len(header)]
  for r in measured(records):
    where = f"{r['mesh']:>5} {r['depth']:>5} {r['optimizer']:>9}"
    if "error" in r:
      lines.append(f"{where} FAILED: {r['error'][:150]}")
      continue
    t = r["by_kind"]["total"]
    e = r.get("extra", {}).get("total", {"count": 0, "bytes": 0})
    ms = f"{r['step_ms']:>8.1f}" if "step_ms" in r else f"{'-':>8}"
    lines.append(
      f"{where} {_kinds(r):>21} {e['count']:>+6d} {_kb(t['bytes']):>8} "
      f"{_signed_kb(e['bytes']):>7} {_kb(r['state']['per_device']):>12} "
      f"{r['state']['ratio']:>9.2f} {r['total_ops']:>5} {ms}"
    )
  return "\n".join(lines)


def _order(records: Sequence[dict[str, Any]], field: str) -> list[Any]:
  return list(dict.fromkeys(r[field] for r in records))


def _find(records: Sequence[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
  return next((r for r in records if all(r[k] == v for k, v in where.items())), None)


def _cell(r: dict[str, Any] | None, show: Any) -> str:
  if r is None:
    return "-"
  if "error" in r:
    return "fails"
  return show(r)


def _full_depth(rs: Sequence[dict[str, Any]]) -> int:
  """The deepest depth measured with every optimizer (the others: SGD and Eva only)."""
  counts = {d: len({r["optimizer"] for r in rs if r["depth"] == d}) for d in _order(rs, "depth")}
  return max(d for d, c in counts.items() if c == max(counts.values()))


def collectives_markdown(records: Sequence[dict[str, Any]]) -> list[str]:
  rs = measured(records)
  depths, optimizers = sorted(_order(rs, "depth")), _order(rs, "optimizer")
  full = _full_depth(rs)
  lines = []
  for mesh in _order(rs, "mesh"):
    label = MESHES[mesh].label if mesh in MESHES else mesh
    lines += [
      f"**{label}** (mesh {tuple(MESHES[mesh].shape)}, rules `{MESHES[mesh].rules}`): "
      "collectives of the step (extra over SGD), their bytes per device (extra over SGD)",
      "",
      "| optimizer | " + " | ".join(f"depth {d}" for d in depths) + f" | kinds (depth {full}) |",
      "|---|" + "---:|" * len(depths) + "---|",
    ]
    for opt in optimizers:
      cells = []
      for d in depths:
        cells.append(
          _cell(
            _find(rs, mesh=mesh, depth=d, optimizer=opt),
            lambda r: (
              (
                f"{r['by_kind']['total']['count']} ({r['extra']['total']['count']:+d}), "
                f"{_kb(r['by_kind']['total']['bytes'])} kB "
                f"({_signed_kb(r['extra']['total']['bytes'])})"
              )
              if "extra" in r
              else f"{r['by_kind']['total']['count']}, {_kb(r['by_kind']['total']['bytes'])} kB"
            ),
          )
        )
      kinds = _cell(_find(rs, mesh=mesh, depth=full, optimizer=opt), _kinds)
      lines.append(f"| {opt} | " + " | ".join(cells) + f" | {kinds} |")
    lines.append("")
  return lines


def state_markdown(records: Sequence[dict[str, Any]]) -> list[str]:
  rs = measured(records)
  depth = _full_depth(rs)
  meshes = _order(rs, "mesh")
  head = " | ".join(MESHES[m].label for m in meshes)

  def table(title: str, cell: Any) -> list[str]:
    """One row per optimizer, one column per mesh: ``cell(record)`` at ``depth``."""
    rows = [title, "", f"| optimizer | {head} |", "|---|" + "---:|" * len(meshes)]
    for opt in _order(rs, "optimizer"):
      cells = [_cell(_find(rs, mesh=m, depth=depth, optimizer=opt), cell) for m in meshes]
      rows.append(f"| {opt} | " + " | ".join(cells) + " |")
    return rows

  lines = table(
    f"Optimizer state per device, kB (all devices' bytes / the logical size: 1 is fully "
    f"sharded, {DEVICES} replicated), depth {depth}:",
    lambda r: f"{_kb(r['state']['per_device'])} (x{r['state']['ratio']:.2f})",
  )
  lines += [""] + table(
    f"Compiled operations (`total_ops`) and step time on the {DEVICES} host devices "
    f"(CPU, ms; median over rounds), depth {depth}:",
    lambda r: f"{r['total_ops']} ops, " + (f"{r['step_ms']:.1f} ms" if "step_ms" in r else "-"),
  )
  return lines + [""]


def failures_markdown(records: Sequence[dict[str, Any]]) -> list[str]:
  failed = [r for r in records if "error" in r]
  if not failed:
    return []
  groups: dict[tuple[str, str], list[str]] = {}
  for r in failed:
    groups.setdefault((r["optimizer"], r["error"]), []).append(
      f"{r['mesh']} {'x'.join(map(str, r['mesh_shape']))} depth {r['depth']}"
    )
  lines = ["Failures (no number measured):", ""]
  for (opt, error), where in groups.items():
    lines.append(f"- **{opt}** on {', '.join(where)}: `{error[:400]}`")
  return lines + [""]


def breakdown_markdown(b: dict[str, Any]) -> list[str]:
  lines = [
    "Eva's extra collectives over SGD by class (kind @ mesh axes spanned: extra count, "
    "extra floats). The extra all-reduced floats against a model: `statistics` = ā and ḡ "
    "of every preconditioned layer on one device (all-reduced over `data` when the batch "
    f"is sharded) + `scalars` = {b['scalars_per_layer']:.2f} floats x preconditioned "
    "layers (6 per block + the head; fitted through 0 on the packed all-reduce, "
    f"`all-reduce@data+model`; with an intercept: {b['scalars_intercept']:.2f}); the extra "
    "all-gathered floats against ā and ḡ whole (every device gets them back):",
    "",
    "| mesh | devices | depth | d_model | vocab | extra collectives (class: count, floats) "
    "| all-reduced | model: statistics + scalars | all-gathered | model: ā, ḡ whole "
    "| match |",
    "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---|",
  ]
  for r in sorted(
    b["rows"], key=lambda r: (r["vocab"], r["devices"], r["mesh"], r["d_model"], r["depth"])
  ):
    classes = "; ".join(
      f"{k}: {c['count']:+d}, {c['elements']:+d}" for k, c in r["classes"].items()
    )
    m = r["model"]
    lines.append(
      f"| {r['mesh']} {'x'.join(map(str, r['mesh_shape']))} | {r['devices']} | {r['depth']} "
      f"| {r['d_model']} | {r['vocab']} | {classes} | {r['all_reduced']} | "
      f"{m['statistics']} + {m['scalars']} = {r['model_all_reduced']} | "
      f"{r['all_gathered']} | {m['gathered']} | {'yes' if r['match'] else '**no**'} |"
    )
  return lines + [""]


def mesh_check_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
  if not rows:
    return []
  lines = [
    "Collective count of the compiled step, SGD / Eva, by mesh size (compiled, not run, "
    "above 8 devices):",
    "",
    "| mesh | depth | "
    + " | ".join(sorted({k for r in rows for k in r["counts"]}, key=lambda s: int(s.split(":")[0])))
    + " | unchanged |",
  ]
  labels = sorted({k for r in rows for k in r["counts"]}, key=lambda s: int(s.split(":")[0]))
  lines[-1] = (
    "| mesh | depth | "
    + " | ".join(f"{k.split(':')[0]} dev. ({k.split(':')[1]})" for k in labels)
    + " | unchanged |"
  )
  lines.append("|---|---:|" + "---:|" * len(labels) + "---|")
  for r in rows:
    cells = []
    for k in labels:
      c = r["counts"].get(k)
      cells.append(
        "-" if c is None else f"{c.get('sgd', '-')} / {c.get('eva', '-')}".replace("None", "fails")
      )
    lines.append(
      f"| {r['mesh']} | {r['depth']} | "
      + " | ".join(cells)
      + f" | {'yes' if r['unchanged'] else '**no**'} |"
    )
  return lines + [""]


def projection_markdown(p: dict[str, Any]) -> list[str]:
  a = p["assumptions"]
  m, intra, inter = a["model"], a["intra"], a["inter"]
  replicated, sharded = p["statistics_parts"]
  counts = ", ".join(f"`{k}` {v:+d}" for k, v in p["measured_extra_counts"].items()) or "none"
  lines = [
    f"**Projection: Eva's extra time per step over SGD at GPT-2-small size** ({a['depth']} "
    f"layers, d_model {m['d_model']}, {m['num_heads']} heads, MLP {m['mlp_dim']}, vocabulary "
    f"50257 padded to {m['vocab']}, sequence {m['seq']}, untied head; global batch "
    f"{m['batch']} sequences = {m['batch'] * m['seq'] / 1e6:.2f} M tokens), on a data x "
    f"model {a['model_axis']} mesh with the `tp` rules ({a['model_axis']} divides the 12 "
    f"heads, 8 would not), {a['host']} accelerators per host, so the model axis stays "
    "inside a host and the data axis crosses hosts.",
    "",
    "Assumptions:",
    "",
    "- α-β model per collective: time = α + f · bytes / β, bytes = the result on one "
    "device, ring factors f over the n devices of its group: all-reduce 2(n−1)/n, "
    f"all-gather (n−1)/n. Within a host α = {intra['alpha_s'] * 1e6:.0f} µs, "
    f"β = {intra['beta_bytes_s'] / 1e9:.0f} GB/s per direction: NVLink 4 gives an H100 "
    "450 GB/s per direction and collective libraries reach a large part of it on big "
    "messages, a TPU v4/v5p chip has several ICI links of some 50 GB/s each; a third of "
    "NVLink leaves room for both, and 10 µs is the order of a small all-reduce's latency "
    f"over 8 NVLink GPUs. Across hosts α = {inter['alpha_s'] * 1e6:.0f} µs, "
    f"β = {inter['beta_bytes_s'] / 1e9:.0f} GB/s per direction per accelerator: one "
    "400 Gb/s (50 GB/s) InfiniBand/RoCE NIC per GPU, half of it reached; α: a few network "
    "hops and the library's start-up. Not measured here: stated figures, to be replaced "
    "by a cluster's own.",
    f"- Scaled from the small decoder: the count of each class of extra collectives is the "
    f"largest measured on the small decoder's data x model meshes ({counts}: the same at "
    "every depth, see the tables above); sizes from the model checked there, at "
    f"GPT-2-small's depth and width: the packed all-reduce carries {p['scalars_per_layer']} "
    f"floats x {p['preconditioned_layers']} preconditioned layers (12 x 6 + the head) over "
    f"every device; the statistics are {replicated} + {sharded} floats per device "
    "(replicated + model-sharded parts), all-reduced over `data` (inside SGD's gradient "
    "all-reduce where the count is +0: bandwidth only); the all-gathers bring every "
    f"device ā and ḡ whole, {p['statistics_whole']} floats, timed as over every device "
    "across hosts (the slowest group). A class without a size model would be named and "
    "not timed.",
    "- Compiled at GPT-2-small size: the same SGD and Eva steps of that decoder lowered and "
    "compiled (not run) on 64 and 256 host devices; every extra class with its own count "
    "and bytes.",
    f"- SGD's step: compute only, {p['flops_per_step'] / 1e15:.3f} PFLOP per step "
    "(per token 6 x matmul parameters + 12 x layers x d_model x sequence), spread over the "
    f"accelerators at {a['utilisation'] * 100:.0f}% of {a['peak_flops'] / 1e12:.0f} TFLOP/s "
    "(H100 SXM, dense bf16). SGD's own communication is left out of its time, so the "
    "percentages are upper bounds for this model.",
    "- Pessimistic: ⌈log2 n⌉ latencies per collective (a tree's hops) instead of one, and "
    "every extra class as a collective of its own.",
    "",
    "| accelerators | mesh | estimate | Eva's extra collectives (class: count, kB, group n, "
    "link) | extra ms/step | SGD ms/step (compute) | extra % | pessimistic ms (%) |",
    "|---:|---|---|---|---:|---:|---:|---:|",
  ]
  for r in p["meshes"]:
    for e in r["estimates"]:
      parts = "; ".join(
        f"{q['class']}: {q['extra_collectives']:+d}, {_kb(q['bytes'])} kB, "
        f"n = {q['group']}, {q['link']}"
        for q in e["parts"]
      )
      if e["unmodelled"]:
        parts += f"; not timed (no size model): {', '.join(e['unmodelled'])}"
      lines.append(
        f"| {r['accelerators']} | {r['mesh']} | {e['source']} | {parts} | "
        f"{e['extra_ms']:.3f} | {r['sgd_ms']:.2f} | {e['extra_percent']:.2f}% | "
        f"{e['extra_ms_pessimistic']:.3f} ({e['extra_percent_pessimistic']:.1f}%) |"
      )
  checks = [
    (r["accelerators"], e["model_check"])
    for r in p["meshes"]
    for e in r["estimates"]
    if "model_check" in e
  ]
  if checks:
    lines += [
      "",
      "The model's sizes against the compiled GPT-2-small step (floats per "
      "device; `-`: no such extra class there):",
      "",
      "| accelerators | statistics (all-reduce@data) "
      "| scalars (all-reduce@data+model) | ā, ḡ whole (all-gathers) |",
      "|---:|---:|---:|---:|",
    ]
    for n, c in checks:
      cell = lambda k: (
        f"{c[k]['measured'] if c[k]['measured'] is not None else '-'} (model {c[k]['model']})"
      )
      lines.append(f"| {n} | {cell('statistics')} | {cell('scalars')} | {cell('gathered')} |")
  return lines + [""]


def markdown(report: dict[str, Any]) -> str:
  m, s = report["machine"], report["settings"]
  v = m["versions"]
  model = ModelConfig(**s["model"])
  lines = [
    "## Sharded meshes",
    "",
    f"`{report['command']}` on {m['cpu'] or m['machine']} ({m['usable_cpus']} usable of "
    f"{m['cpu_count']} CPUs), jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, "
    f"eva_optax {v['eva_optax']}"
    + (
      f" (commit {report['library']['commit'][:10]}"
      + (", with uncommitted changes" if report["library"]["eva_optax_uncommitted"] else "")
      + ")"
      if report.get("library", {}).get("commit")
      else ""
    )
    + (
      "; **the library changed between the workers' imports**"
      if report.get("library_changed_during_run")
      else ""
    )
    + f"; total {report['total_s'] / 60:.1f} min. "
    "The MaxText-style decoder of `examples/harness/sharded.py` "
    f"(d_model {model.d_model}, {model.num_heads} heads, MLP {model.mlp_dim}, vocabulary "
    f"{model.vocab}, sequence {model.seq}, batch {model.batch}; depths "
    f"{', '.join(map(str, s['depths']))}"
    + (
      f", and {', '.join(map(str, s['scaling_depths']))} for SGD and Eva only"
      if s.get("scaling_depths")
      else ""
    )
    + f") on {DEVICES} host devices "
    f"(`XLA_FLAGS={DEVICE_FLAG}={DEVICES}`), parameters placed by the logical axis rules, "
    "the optimizer state by `eva_optax.state_shardings`, the batch over `data`; every "
    "optimizer from the examples' registry (momentum 0.9, weight decay 5e-4; K-FAC's "
    "factors and inverses, Shampoo's roots every 10 steps). One jitted step (gradient and "
    "statistics, update, `apply_updates`); its collectives read from the compiled program "
    "(a collective inside a `cond`, e.g. K-FAC's inverses, counts once), bytes = the "
    "collective's result on one device. Step times are of "
    f"{DEVICES} XLA devices sharing {m['usable_cpus']} CPU cores: CPU numbers "
    f"({s['rounds']} rounds x {s['steps']} steps after {s['warmup']} + 1), not an "
    "accelerator's.",
    "",
    *collectives_markdown(report["records"]),
    *state_markdown(report["records"]),
    *failures_markdown(report["records"]),
  ]
  if report.get("breakdown"):
    lines += breakdown_markdown(report["breakdown"])
  if report.get("mesh_check"):
    lines += mesh_check_markdown(report["mesh_check"])
  if report.get("large_note"):
    lines += [report["large_note"], ""]
  if report.get("projection"):
    lines += projection_markdown(report["projection"])
  return "\n".join(lines).rstrip() + "\n"
