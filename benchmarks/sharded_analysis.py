"""The sharded benchmark's analysis: the extra over SGD, Eva's extra collectives against a
model of its statistics, the mesh-size check and the alpha-beta projection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.sharded_config import MESHES, MeshConfig, ModelConfig

# ---------------------------------------------------------------------------
# Analysis: extra over SGD, Eva's extra collectives against a model, projection.


def _same_setting(a: dict[str, Any], b: dict[str, Any]) -> bool:
  return (a["mesh"], a["mesh_shape"], a["depth"], a["model"]) == (
    b["mesh"],
    b["mesh_shape"],
    b["depth"],
    b["model"],
  )


def add_extra(records: list[dict[str, Any]]) -> None:
  """``extra``: each record's collectives (count and bytes, total and by kind) minus those
  of SGD in the same setting; ``state_over_sgd`` and ``ops_over_sgd`` likewise."""
  for r in records:
    sgd = next((s for s in records if s["optimizer"] == "sgd" and _same_setting(s, r)), None)
    if sgd is None or "error" in r or "error" in sgd:
      continue
    kinds = set(r["by_kind"]) | set(sgd["by_kind"])
    zero = {"count": 0, "bytes": 0}
    r["extra"] = {
      k: {
        f: r["by_kind"].get(k, zero)[f] - sgd["by_kind"].get(k, zero)[f] for f in ("count", "bytes")
      }
      for k in sorted(kinds)
    }
    r["state_over_sgd"] = r["state"]["per_device"] / sgd["state"]["per_device"]
    r["ops_over_sgd"] = r["total_ops"] / sgd["total_ops"]


def by_class(record: dict[str, Any]) -> dict[str, dict[str, int]]:
  """Collectives by ``kind@axes`` (e.g. ``all-reduce@data``): count, elements and bytes."""
  out: dict[str, dict[str, int]] = {}
  for c in record["collectives"]:
    entry = out.setdefault(f"{c['kind']}@{c['axes']}", {"count": 0, "elements": 0, "bytes": 0})
    entry["count"] += 1
    entry["elements"] += c["elements"]
    entry["bytes"] += c["bytes"]
  return out


def extra_by_class(eva: dict[str, Any], sgd: dict[str, Any]) -> dict[str, dict[str, int]]:
  """Eva's collectives by class minus SGD's (the classes where they differ)."""
  a, b = by_class(eva), by_class(sgd)
  zero = {"count": 0, "elements": 0, "bytes": 0}
  out = {}
  for k in sorted(set(a) | set(b)):
    d = {f: a.get(k, zero)[f] - b.get(k, zero)[f] for f in ("count", "elements", "bytes")}
    if d["count"] or d["elements"]:
      out[k] = d
  return out


def preconditioned_layers(depth: int) -> int:
  """Layers of the decoder Eva preconditions: query, key, value, out, up, down per block,
  and the head (embeddings and LayerNorms pass through)."""
  return 6 * depth + 1


def statistics_parts(model: ModelConfig, depth: int, model_shards: int) -> tuple[int, int]:
  """Floats of Eva's statistics (ā and ḡ of every preconditioned layer) on one device under
  the ``tp`` rules with ``model_shards`` devices on ``model``: ``(replicated, sharded)``,
  the parts along ``embed`` (replicated) and those along heads, MLP units or the vocabulary
  (this device's shard, the dimension padded to a multiple of the shards)."""
  shard = lambda n: -(-n // model_shards)
  d, heads = model.d_model, model.num_heads
  head_dim = d // heads
  # per block: ā of query, key, value, up; ḡ of out, down (embed) / ḡ of query, key,
  # value, ā of out (heads x kv); ḡ of up, ā of down (MLP units)
  replicated = depth * 6 * d + d  # + the head's ā
  sharded = depth * (4 * shard(heads) * head_dim + 2 * shard(model.mlp_dim)) + shard(model.vocab)
  return replicated, sharded


def statistics_floats(model: ModelConfig, depth: int, model_shards: int) -> int:
  """All of :func:`statistics_parts` on one device."""
  return sum(statistics_parts(model, depth, model_shards))


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
  """Least-squares ``(intercept, slope)`` of ``ys`` on ``xs`` (slope 0 for one point)."""
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
  return my - slope * mx, slope


def _model_shards(record: dict[str, Any]) -> int:
  return record["mesh_shape"][1] if MESHES[record["mesh"]].rules == "tp" else 1


def modelled_floats(record: dict[str, Any], scalars_per_layer: int) -> dict[str, int]:
  """The model of Eva's extra floats over SGD in ``record``'s setting: all-reduced,
  ``statistics`` (every part on this device, over ``data`` when the batch is sharded) and
  ``scalars`` (the packed all-reduce); all-gathered, ``gathered``: ā and ḡ whole (what
  every device gets back for the update, whatever the mesh)."""
  m = ModelConfig(**record["model"])
  data = record["mesh_shape"][0]
  replicated, sharded = statistics_parts(m, record["depth"], _model_shards(record))
  return {
    "statistics": replicated + sharded if data > 1 else 0,
    "scalars": scalars_per_layer * preconditioned_layers(record["depth"]),
    "gathered": statistics_floats(m, record["depth"], 1),
  }


def eva_pairs(records: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """``(eva, sgd)`` records of the same setting, both compiled."""
  pairs = []
  for eva in records:
    if eva["optimizer"] != "eva" or "error" in eva:
      continue
    sgd = next(
      (
        s for s in records if s["optimizer"] == "sgd" and _same_setting(s, eva) and "error" not in s
      ),
      None,
    )
    if sgd is not None:
      pairs.append((eva, sgd))
  return pairs


def eva_breakdown(records: list[dict[str, Any]]) -> dict[str, Any]:
  """Eva's extra collectives over SGD in every setting where both compiled, by class, and
  the model of :func:`modelled_floats`, whose ``scalars_per_layer`` is fitted here: the
  extra floats of the packed all-reduce (``all-reduce@data+model``) per preconditioned
  layer, through the origin, on the data x model meshes (an ordinary fit's intercept as a
  check). ``match``: whether the extra all-reduced floats (every all-reduce class: on a
  mesh with one axis the step merges statistics and scalars) are the model's
  ``statistics + scalars`` and the extra all-gathered floats its ``gathered``; other
  extra collectives are listed in ``not_modelled``."""
  pairs = eva_pairs(records)
  packed = "all-reduce@data+model"
  points = [
    (preconditioned_layers(e["depth"]), extra_by_class(e, s)[packed]["elements"])
    for e, s in pairs
    if packed in extra_by_class(e, s)
  ]
  per_layer = (
    sum(x * y for x, y in points) / sum(x * x for x, _ in points) if points else float("nan")
  )
  intercept = fit_line(*zip(*points))[0] if len({x for x, _ in points}) > 1 else float("nan")
  per_layer_int = round(per_layer) if points else 0
  rows = []
  for eva, sgd in pairs:
    classes = extra_by_class(eva, sgd)
    model = modelled_floats(eva, per_layer_int)
    reduced = sum(c["elements"] for k, c in classes.items() if k.startswith("all-reduce"))
    gathered = sum(c["elements"] for k, c in classes.items() if k.startswith("all-gather"))
    others = {k: c for k, c in classes.items() if not k.startswith(("all-reduce", "all-gather"))}
    expected = model["statistics"] + model["scalars"]
    rows.append(
      {
        "mesh": eva["mesh"],
        "mesh_shape": eva["mesh_shape"],
        "devices": eva["devices"],
        "depth": eva["depth"],
        "d_model": ModelConfig(**eva["model"]).d_model,
        "vocab": ModelConfig(**eva["model"]).vocab,
        "extra_count": sum(c["count"] for c in classes.values()),
        "extra_elements": sum(c["elements"] for c in classes.values()),
        "classes": classes,
        "model": model,
        "all_reduced": reduced,
        "model_all_reduced": expected,
        "all_gathered": gathered,
        "match": reduced == expected and gathered == model["gathered"],
        "not_modelled": others,
      }
    )
  return {
    "scalars_per_layer": per_layer,
    "scalars_intercept": intercept,
    "scalars_points": points,
    "rows": rows,
  }


#: The projection's name for Eva's extra all-gathers, whatever axes they span.
GATHERS = "all-gathers (any axes)"


@dataclass(frozen=True)
class Link:
  """An α-β link: latency per collective and bandwidth per direction per device."""

  name: str
  alpha_s: float
  beta_bytes_s: float


#: GPT-2 small's shape, the vocabulary padded from 50257 to a multiple of 128 (so that it
#: divides the model axis, as GPT-2 reimplementations do); global batch 512 x 1024 tokens.
GPT2_SMALL = ModelConfig(vocab=50304, d_model=768, num_heads=12, mlp_dim=3072, seq=1024, batch=512)


@dataclass(frozen=True)
class Assumptions:
  """The projection's model and machine (see the markdown's "Assumptions")."""

  model: ModelConfig = GPT2_SMALL
  depth: int = 12
  accelerators: tuple[int, ...] = (64, 256)
  model_axis: int = 4  # 12 heads: 4 divides them, 8 does not
  host: int = 8  # accelerators per host (NVLink / ICI domain)
  intra: Link = Link("within a host", 10e-6, 150e9)
  inter: Link = Link("across hosts", 30e-6, 25e9)
  peak_flops: float = 989e12  # H100 SXM, dense bf16
  utilisation: float = 0.4

  def mesh(self, n: int) -> MeshConfig:
    return MeshConfig(
      "tp",
      (n // self.model_axis, self.model_axis),
      "tp",
      f"data {n // self.model_axis} × model {self.model_axis}",
    )


def ring_factor(kind: str, n: int) -> float:
  """Bytes each device sends per byte of the collective's result (ring algorithms):
  all-reduce 2(n-1)/n, all-gather and all-to-all (n-1)/n; reduce-scatter n-1 (its result
  is 1/n of what it reduces)."""
  if n <= 1:
    return 0.0
  return {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": float(n - 1)}.get(kind, (n - 1) / n)


def class_time(cls: str, count: int, nbytes: float, n: int, a: Assumptions) -> dict[str, Any]:
  """α-β time of a class of extra collectives on ``n`` accelerators (data x model mesh):
  ``count`` x α + factor x bytes / β, the link within a host for a group on ``model`` (the
  model axis is inside a host), across hosts otherwise; pessimistic: at least one α and
  ⌈log2 group⌉ of them (a tree's hops) per collective."""
  kind, axes = cls.split("@")
  data = n // a.model_axis
  group = {"data": data, "model": a.model_axis, "data+model": n}.get(axes, n)
  link = a.intra if axes == "model" and a.model_axis <= a.host else a.inter
  bandwidth = ring_factor(kind, group) * nbytes / link.beta_bytes_s
  hops = max(1, math.ceil(math.log2(group))) if group > 1 else 0
  return {
    "class": cls,
    "extra_collectives": count,
    "bytes": nbytes,
    "group": group,
    "link": link.name,
    "ms": 1e3 * (count * link.alpha_s + bandwidth),
    "ms_pessimistic": 1e3 * (max(count, 1) * hops * link.alpha_s + bandwidth),
  }


def model_flops_per_token(model: ModelConfig, depth: int) -> float:
  """Training FLOPs per token: 6 x (matmul parameters) + 12 x layers x d_model x seq
  (attention's scores and mixing, forward and backward)."""
  d = model.d_model
  matmul_params = depth * (4 * d * d + 2 * d * model.mlp_dim) + d * model.vocab
  return 6 * matmul_params + 12 * depth * d * model.seq


def projection(
  breakdown: dict[str, Any], records: Sequence[dict[str, Any]], a: Assumptions = Assumptions()
) -> dict[str, Any]:
  """Eva's extra time per step over SGD, GPT-2-small size on a data x model mesh.

  Two estimates per accelerator count. ``scaled``: the extra collectives measured on the
  small decoder's data x model meshes (per all-reduce class, and for the all-gathers
  together: the largest count seen), their sizes from :func:`modelled_floats` at
  GPT-2-small's depth and width (statistics → ``all-reduce@data``, scalars →
  ``all-reduce@data+model``, ā and ḡ whole → the all-gathers, timed as over every device
  across hosts); another class is listed, not timed. ``compiled``: the SGD and Eva steps
  of the GPT-2-small-sized decoder compiled (not run) on that many host devices, every
  extra class with its measured count and bytes.
  """
  tp_rows = [
    r
    for r in breakdown["rows"]
    if r["mesh_shape"][0] > 1 and r["mesh_shape"][1] > 1 and r["vocab"] != a.model.vocab
  ]
  counts: dict[str, int] = {}
  for r in tp_rows:
    gathers = 0
    for k, c in r["classes"].items():
      if k.startswith("all-gather"):
        gathers += c["count"]
      else:
        counts[k] = max(counts.get(k, 0), c["count"])
    counts[GATHERS] = max(counts.get(GATHERS, 0), gathers)
  per_layer = round(breakdown["scalars_per_layer"]) if tp_rows else 0
  flops = model_flops_per_token(a.model, a.depth) * a.model.batch * a.model.seq
  meshes = []
  for n in a.accelerators:
    mesh = a.mesh(n)
    fake = {
      "model": asdict(a.model),
      "mesh_shape": list(mesh.shape),
      "mesh": "tp",
      "depth": a.depth,
    }
    model = modelled_floats(fake, per_layer)
    sizes = {
      "all-reduce@data": model["statistics"],
      "all-reduce@data+model": model["scalars"],
      GATHERS: model["gathered"],
    }
    scaled = []
    for k, c in counts.items():
      # an all-reduce class with +0 rides in SGD's (bytes, no latency); +0 all-gathers:
      # none
      if k in sizes and (c or (sizes[k] and k != GATHERS)):
        part = class_time("all-gather@data+model" if k == GATHERS else k, c, 4 * sizes[k], n, a)
        scaled.append({**part, "class": k})
    unmodelled = sorted(k for k in counts if k not in sizes)
    sgd_ms = 1e3 * flops / n / (a.peak_flops * a.utilisation)
    estimates = [
      {"source": "scaled from the small decoder", "parts": scaled, "unmodelled": unmodelled}
    ]
    at_size = [
      (e, s)
      for e, s in eva_pairs(records)
      if e["model"] == asdict(a.model)
      and e["depth"] == a.depth
      and e["mesh_shape"] == list(mesh.shape)
    ]
    if at_size:
      classes = extra_by_class(*at_size[0])
      gathered = sum(c["elements"] for k, c in classes.items() if k.startswith("all-gather"))
      estimates.append(
        {
          "source": "compiled at GPT-2-small size",
          "parts": [class_time(k, c["count"], c["bytes"], n, a) for k, c in classes.items()],
          "unmodelled": [],
          "model_check": {
            "statistics": {
              "measured": classes.get("all-reduce@data", {}).get("elements"),
              "model": model["statistics"],
            },
            "scalars": {
              "measured": classes.get("all-reduce@data+model", {}).get("elements"),
              "model": model["scalars"],
            },
            "gathered": {"measured": gathered or None, "model": model["gathered"]},
          },
        }
      )
    for e in estimates:
      e["extra_ms"] = sum(p["ms"] for p in e["parts"])
      e["extra_ms_pessimistic"] = sum(p["ms_pessimistic"] for p in e["parts"])
      e["extra_percent"] = 100 * e["extra_ms"] / sgd_ms
      e["extra_percent_pessimistic"] = 100 * e["extra_ms_pessimistic"] / sgd_ms
    meshes.append({"accelerators": n, "mesh": mesh.label, "sgd_ms": sgd_ms, "estimates": estimates})
  return {
    "assumptions": asdict(a),
    "preconditioned_layers": preconditioned_layers(a.depth),
    "scalars_per_layer": per_layer,
    "statistics_parts": statistics_parts(a.model, a.depth, a.model_axis),
    "statistics_whole": statistics_floats(a.model, a.depth, 1),
    "flops_per_step": flops,
    "measured_extra_counts": counts,
    "meshes": meshes,
  }


def mesh_size_check(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per mesh kind and depth: SGD's and Eva's collective counts at every device count."""
  rows: dict[tuple[str, int], dict[str, Any]] = {}
  for r in records:
    if r["optimizer"] not in ("sgd", "eva") or r["model"] != asdict(ModelConfig()):
      continue
    row = rows.setdefault(
      (r["mesh"], r["depth"]), {"mesh": r["mesh"], "depth": r["depth"], "counts": {}}
    )
    label = f"{r['devices']}:{'x'.join(map(str, r['mesh_shape']))}"
    cell = row["counts"].setdefault(label, {})
    cell[r["optimizer"]] = None if "error" in r else r["by_kind"]["total"]["count"]
  out = []
  for key in sorted(rows):
    row = rows[key]
    if len(row["counts"]) > 1:
      extras = {
        k: (v.get("eva") - v.get("sgd"))
        if None not in (v.get("eva"), v.get("sgd")) and len(v) == 2
        else None
        for k, v in row["counts"].items()
      }
      row["eva_extra"] = extras
      row["unchanged"] = len({json.dumps(v, sort_keys=True) for v in row["counts"].values()}) == 1
      out.append(row)
  return out
