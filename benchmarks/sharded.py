"""Eva and the baselines on sharded meshes: collectives, state per device, ops, step time.

The model is the MaxText-style decoder of ``examples/harness/sharded.py`` (logical axis
names on the parameters, logical constraints on the activations), by default d_model 64,
8 heads (so that 8 devices on ``model`` divide them), MLP 256, vocabulary 64, sequence 16,
batch 16, at 1 and 2 layers for every optimizer and 4 layers for SGD and Eva (the depth
scaling of Eva's extra collectives). Every optimizer of the examples' registry
(``examples/harness/optimizers.py``: SGD, AdamW, Eva, Eva-f, Eva-s, K-FAC, Shampoo, Muon;
momentum 0.9, weight decay 5e-4, K-FAC's factors and inverses and Shampoo's roots every 10
steps; ``layouts=`` from an abstract capture where the optimizer takes them) trains it with
one jitted step (gradient and statistics, optimizer update, ``optax.apply_updates``;
parameters and state donated), the parameters placed by the logical axis rules, the
optimizer state by ``eva_optax.state_shardings``, the batch over ``data``. Four meshes of 8
host devices:

- ``data``: mesh (8, 1), rules ``data`` (parameters replicated);
- ``tp``: mesh (2, 4), rules ``tp`` (Megatron over ``model``, batch over ``data``);
- ``model``: mesh (1, 8), rules ``tp``;
- ``fsdp``: mesh (8, 1), rules ``fsdp`` (``embed`` axis of every parameter over ``data``).

Measured per depth, optimizer and mesh, from the compiled step
(``examples.harness.compiled_ops``): the collectives by kind (count and bytes of their
results per device; a collective inside a ``cond`` counts once, whether or not the step
takes that branch) and by the mesh axes their replica groups span, the top-level
operations (``total_ops``), the optimizer state's bytes on one device and the ratio of all
devices' bytes to the logical size (1: fully sharded; 8: replicated), and the step time on
the host devices: the median over ``--rounds`` of the mean time of ``--steps`` consecutive
steps (whole periods of K-FAC and Shampoo), after ``--warmup`` steps. The 8 devices are 8
XLA devices of one process sharing this machine's cores: the times are CPU numbers, which
say nothing of an accelerator's step. A job that fails (e.g. an optimizer whose state
``state_shardings`` cannot place) is reported with its error, not skipped.

Projection (not with ``--quick``):

- mesh size: the SGD and Eva steps lowered and compiled, not run, on ``--large-devices``
  host devices (default 64 and 256, one process each; meshes (n, 1) with the ``data`` and
  ``fsdp`` rules, (n/8, 8) with ``tp``), to see whether the collectives' count changes with
  the mesh's size; also a second width (``--width-check``) on the ``tp`` mesh;
- Eva's extra all-reduced floats against a model (its statistics on one device + a fitted
  number of scalars per preconditioned layer), checked on every setting measured;
- an α-β model of Eva's extra time per step for a GPT-2-small-sized decoder on a data x
  model 4 mesh of 64 and 256 accelerators: once with the extra collectives' counts measured
  on the small decoder and their sizes from the model at GPT-2-small's depth and width, once
  with the extra collectives of the GPT-2-small-sized step itself, compiled on 64 and 256
  host devices. The markdown states the model and its assumptions.

Output: a table on stdout and, unless ``--no-save`` (or ``--quick``),
``benchmarks/results/sharded.{json,md}`` (summarised in docs/multi_device.md, "Sharded parameters").
Every 8-device job runs in one worker process (``--workers`` to split them), the large
meshes in one process per device count; all import the library at the start, so that they
measure the same code. With ``--in-process`` (the default of ``--quick`` when this process
already has 8 devices, as under the test suite) the 8-device jobs run here.

Usage::

    python -m benchmarks.sharded                      # everything, results saved (~12 min)
    python -m benchmarks.sharded --quick              # depth 1, SGD and Eva, mesh tp
    python -m benchmarks.sharded --depths 1,2 --optimizers sgd,eva --meshes tp,fsdp
"""

from __future__ import annotations

import os

# As in benchmarks/step_time.py: one OpenBLAS thread (set before numpy and jax are imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.records import save_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEVICE_FLAG = "--xla_force_host_platform_device_count"
REPLY = "RESULT "  # prefix of a worker's answer line on stdout
DEVICES = 8  # the measured meshes
OPTIMIZERS = ("sgd", "adamw", "eva", "eva-f", "eva-s", "kfac", "shampoo", "muon")
LEARNING_RATE = 0.01  # the same for all: only the cost of a step is measured


@dataclass(frozen=True)
class MeshConfig:
  """A mesh: its name, shape ``(data, model)``, the logical axis rules and a label."""

  name: str
  shape: tuple[int, int]
  rules: str
  label: str


MESHES: dict[str, MeshConfig] = {
  "data": MeshConfig("data", (8, 1), "data", "data 8"),
  "tp": MeshConfig("tp", (2, 4), "tp", "data 2 × model 4"),
  "model": MeshConfig("model", (1, 8), "tp", "model 8"),
  "fsdp": MeshConfig("fsdp", (8, 1), "fsdp", "FSDP 8"),
}


@dataclass(frozen=True)
class ModelConfig:
  """The decoder's size and the batch."""

  vocab: int = 64
  d_model: int = 64
  num_heads: int = 8
  mlp_dim: int = 256
  seq: int = 16
  batch: int = 16


def large_meshes(devices: int) -> dict[str, MeshConfig]:
  """The projection's meshes on ``devices`` host devices: data, data × model 8, FSDP."""
  model = 8 if devices % 8 == 0 and devices > 8 else 1
  return {
    "data": MeshConfig("data", (devices, 1), "data", f"data {devices}"),
    "tp": MeshConfig(
      "tp", (devices // model, model), "tp", f"data {devices // model} × model {model}"
    ),
    "fsdp": MeshConfig("fsdp", (devices, 1), "fsdp", f"FSDP {devices}"),
  }


# ---------------------------------------------------------------------------
# Worker: one process, one device count.


def _axes(group: Sequence[int], shape: tuple[int, int]) -> str:
  """The mesh axes a replica group spans: ``data``, ``model``, ``data+model`` or ``-``
  (device ids are positions in the mesh's row-major order)."""
  rows = {i // shape[1] for i in group}
  cols = {i % shape[1] for i in group}
  spanned = [name for name, seen in (("data", rows), ("model", cols)) if len(seen) > 1]
  return "+".join(spanned) or "-"


def _state_bytes(state: Any, devices: int) -> dict[str, float]:
  """Bytes of the state on one device (the first shard of every leaf), of all devices
  together, and logical (every leaf once); from the shardings, nothing read."""
  import jax
  import numpy as np

  one = logical = 0
  for leaf in jax.tree.leaves(state):
    itemsize = np.dtype(leaf.dtype).itemsize
    logical += math.prod(leaf.shape) * itemsize
    one += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
  return {
    "per_device": one,
    "all_devices": one * devices,
    "logical": logical,
    "ratio": one * devices / logical if logical else float("nan"),
  }


def build_step(
  key: str, model_config: ModelConfig, depth: int, mesh_config: MeshConfig
) -> dict[str, Any]:
  """The jitted step of optimizer ``key`` on a mesh, and abstract arguments for it.

  Returns ``step`` (jitted, shardings given, parameters and state donated), ``init``
  (key -> params, state, placed), ``abstract`` (the arguments as
  ``jax.ShapeDtypeStruct``\\ s with their shardings), ``mesh`` and ``rules``.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  import eva_optax
  from examples.harness import optimizers, sharded

  spec = optimizers.SPEC_BY_KEY[key]
  mesh = sharded.make_mesh(mesh_config.shape)
  rules = sharded.RULES[mesh_config.rules]
  model = sharded.Decoder(
    vocab=model_config.vocab,
    d_model=model_config.d_model,
    num_heads=model_config.num_heads,
    mlp_dim=model_config.mlp_dim,
    num_layers=depth,
    max_len=model_config.seq,
  )
  loss_fn = sharded.next_token_loss(model)
  batch = max(model_config.batch, mesh_config.shape[0])
  token_sharding = NamedSharding(mesh, PartitionSpec("data"))
  tokens = jax.ShapeDtypeStruct((batch, model_config.seq + 1), jnp.int32, sharding=token_sharding)
  inputs = jax.ShapeDtypeStruct((batch, model_config.seq), jnp.int32, sharding=token_sharding)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
    param_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
      jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
      param_sharding,
    )
    grad_fn = None
    kwargs = {}
    if spec.statistics is not None:
      grad_fn = eva_optax.value_and_grad(
        loss_fn, statistics=spec.statistics, **dict(spec.capture_options)
      )
      if spec.accepts("layouts"):
        kwargs["layouts"] = eva_optax.layouts_of(jax.eval_shape(grad_fn, params, tokens)[2])
    tx = spec.build(LEARNING_RATE, optimizers.Options(), **kwargs)
    state_sharding = eva_optax.state_shardings(tx, params)
    state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(tx.init, params),
      state_sharding,
    )

  gated = spec.capture == "gated"
  plain = spec.capture == "plain"

  def step(params: Any, state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
    with nn.logical_axis_rules(rules):
      if plain:
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, state = tx.update(grads, state, params)
      else:
        extra = {"factors_due": eva_optax.factors_due(state)} if gated else {}
        loss, grads, stats = grad_fn(params, tokens, **extra)
        updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  jitted = jax.jit(
    step,
    in_shardings=(param_sharding, state_sharding, token_sharding),
    out_shardings=(param_sharding, state_sharding, NamedSharding(mesh, PartitionSpec())),
    donate_argnums=(0, 1),
  )

  def init(seed: int) -> tuple[Any, Any, jax.Array]:
    import numpy as np

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      p = jax.jit(
        lambda k: nn.unbox(model.init(k, jnp.zeros(inputs.shape, jnp.int32))["params"]),
        out_shardings=param_sharding,
      )(jax.random.key(seed))
      s = jax.jit(tx.init, out_shardings=state_sharding)(p)
    data = np.random.default_rng(seed).integers(0, model_config.vocab, tokens.shape)
    return p, s, jax.device_put(jnp.asarray(data, jnp.int32), token_sharding)

  return {
    "step": jitted,
    "init": init,
    "abstract": (params, state, tokens),
    "mesh": mesh,
    "rules": rules,
  }


def compile_job(job: Job) -> tuple[dict[str, Any], tuple[Any, Any]]:
  """One optimizer, depth and mesh, compiled from abstract arguments: its record
  (collectives, ops, state bytes) and ``(compiled step, init)`` for :func:`time_job`."""
  import flax.linen as nn
  import jax

  from examples.harness import compiled_ops

  built = build_step(job.optimizer, job.model, job.depth, job.mesh)
  params, state, tokens = built["abstract"]
  t0 = time.perf_counter()
  with jax.set_mesh(built["mesh"]), nn.logical_axis_rules(built["rules"]):
    compiled = built["step"].lower(params, state, tokens).compile()
  compile_s = time.perf_counter() - t0
  devices = math.prod(job.mesh.shape)
  found = compiled_ops.grouped_collectives(compiled)
  record: dict[str, Any] = {
    "optimizer": job.optimizer,
    "depth": job.depth,
    "mesh": job.mesh.name,
    "mesh_shape": list(job.mesh.shape),
    "devices": devices,
    "model": asdict(job.model),
    "compile_s": compile_s,
    "total_ops": compiled_ops.total_ops(compiled),
    "collectives": [
      {
        "kind": c.kind,
        "elements": c.elements,
        "bytes": c.bytes,
        "group_size": len(c.group),
        "axes": _axes(c.group, job.mesh.shape),
      }
      for c in found
    ],
    "state": _state_bytes(state, devices),
  }
  record["by_kind"] = by_kind(record["collectives"])
  return record, (compiled, built["init"])


def time_job(
  record: dict[str, Any],
  runner: tuple[Any, Any],
  *,
  warmup: int,
  rounds: int,
  steps: int,
  seed: int,
) -> None:
  """Run a compiled step: ``1 + warmup`` steps, then ``rounds`` x ``steps`` timed;
  ``step_ms`` (median over rounds of the mean per step), the rounds and the last loss
  go into ``record``."""
  import jax
  import numpy as np

  compiled, init = runner
  p, s, batch = init(seed)
  for _ in range(1 + warmup):
    p, s, loss = compiled(p, s, batch)
  jax.block_until_ready(loss)
  per_step = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      p, s, loss = compiled(p, s, batch)
    jax.block_until_ready((p, s, loss))
    per_step.append(1e3 * (time.perf_counter() - t0) / steps)
  record["step_ms"] = statistics.median(per_step)
  record["step_ms_rounds"] = per_step
  record["loss"] = float(loss)
  record["loss_finite"] = bool(np.isfinite(float(loss)))


def by_kind(found: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
  """``{kind: {"count", "bytes"}}`` of a record's collectives, and ``total``."""
  out: dict[str, dict[str, int]] = {}
  for c in found:
    entry = out.setdefault(c["kind"], {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += c["bytes"]
  out["total"] = {
    "count": sum(c["count"] for c in out.values()),
    "bytes": sum(c["bytes"] for c in out.values()),
  }
  return out


@dataclass(frozen=True)
class Job:
  """One measurement of a worker."""

  optimizer: str
  depth: int
  mesh: MeshConfig
  model: ModelConfig
  run: bool


class Jobs:
  """Jobs of one process (its devices enough for every mesh): :meth:`compile` all, then
  :meth:`time` those to run. A job that raises gives a record with its ``error``."""

  def __init__(self, jobs: Sequence[Job], log: Any = print):
    self.jobs = list(jobs)
    self.log = log
    self.records: list[dict[str, Any]] = []
    self.runners: list[tuple[Any, Any] | None] = []

  def compile(self) -> None:
    for job in self.jobs:
      t0 = time.perf_counter()
      try:
        record, runner = compile_job(job)
      except Exception as error:  # reported, not hidden: the tables show it
        record, runner = (
          {
            "optimizer": job.optimizer,
            "depth": job.depth,
            "mesh": job.mesh.name,
            "mesh_shape": list(job.mesh.shape),
            "devices": math.prod(job.mesh.shape),
            "model": asdict(job.model),
            "error": f"{type(error).__name__}: {_first_line(error)}",
          },
          None,
        )
      self.log(_progress(record, time.perf_counter() - t0))
      self.records.append(record)
      self.runners.append(runner if job.run else None)

  def time(self, args: argparse.Namespace) -> list[dict[str, Any]]:
    for record, runner in zip(self.records, self.runners):
      if runner is None:
        continue
      try:
        time_job(
          record, runner, warmup=args.warmup, rounds=args.rounds, steps=args.steps, seed=args.seed
        )
      except Exception as error:
        record["error"] = f"{type(error).__name__} while running: {_first_line(error)}"
      self.log(_progress(record, sum(record.get("step_ms_rounds", [0])) * args.steps / 1e3))
    self.runners = [None] * len(self.records)
    return self.records


def _first_line(error: BaseException) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  text = " ".join(lines[:6]) if lines else repr(error)
  return text[:500]


def _progress(record: dict[str, Any], seconds: float) -> str:
  where = f"{record['mesh']:>5} depth {record['depth']} {record['optimizer']:>7}"
  if "error" in record:
    return f"{where}: FAILED {record['error']}"
  c = record["by_kind"]["total"]
  timing = f", {record['step_ms']:.1f} ms/step" if "step_ms" in record else ""
  return (
    f"{where}: {c['count']} collectives, {c['bytes']} B, {record['total_ops']} ops, "
    f"state x{record['state']['ratio']:.2f}{timing} ({seconds:.1f} s)"
  )


def _job_from_dict(d: dict[str, Any]) -> Job:
  mesh = d["mesh"]
  return Job(
    d["optimizer"],
    d["depth"],
    MeshConfig(mesh["name"], tuple(mesh["shape"]), mesh["rules"], mesh["label"]),
    ModelConfig(**d["model"]),
    d["run"],
  )


def _reply(message: dict[str, Any]) -> None:
  print(REPLY + json.dumps(message), flush=True)


def worker(devices: int) -> None:
  """A worker process: reads its jobs and settings (one JSON line on stdin), imports the
  library and answers ``imported`` with its state; on ``compile`` compiles every job and
  answers ``ready``; on ``time`` runs the jobs to time; answers the records. Progress goes
  to stderr."""
  request = json.loads(sys.stdin.readline())
  import jax

  import eva_optax  # noqa: F401  (imported now: every worker measures the same code)
  from examples.harness import optimizers, sharded  # noqa: F401

  if jax.device_count() < devices:
    raise SystemExit(f"worker: {jax.device_count()} devices, {devices} wanted")
  _reply({"imported": _library_state()})
  jobs = Jobs(
    [_job_from_dict(j) for j in request["jobs"]],
    log=lambda m: print(f"[{devices} devices] {m}", file=sys.stderr, flush=True),
  )
  if sys.stdin.readline().strip() == "compile":
    jobs.compile()
  _reply({"ready": len(jobs.records)})
  if sys.stdin.readline().strip() == "time":
    jobs.time(argparse.Namespace(**request["settings"]))
  _reply({"records": jobs.records})


class Worker:
  """A worker subprocess with ``devices`` host devices and its jobs."""

  def __init__(self, devices: int, jobs: Sequence[Job], args: argparse.Namespace):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env = {
      **os.environ,
      "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"]),
      "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
      "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    self.devices = devices
    self.process = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.sharded", "--worker", str(devices)],
      env=env,
      cwd=ROOT,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    settings = {k: getattr(args, k) for k in ("warmup", "rounds", "steps", "seed")}
    self.send(json.dumps({"jobs": [asdict(j) for j in jobs], "settings": settings}))
    self.library: dict[str, str] = {}

  def send(self, line: str) -> None:
    self.process.stdin.write(line + "\n")
    self.process.stdin.flush()

  def read(self) -> dict[str, Any]:
    for line in self.process.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY) :])
    status = self.process.wait()
    raise RuntimeError(f"worker with {self.devices} devices exited (status {status})")

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.process.stdin.close()
        self.process.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()


def run_workers(
  plan: Sequence[tuple[int, Sequence[Job]]],
  args: argparse.Namespace,
  parallel: int = 1,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
  """``(devices, jobs)`` per worker. Every worker starts and imports the library at once
  (so all measure the same code, even if it is edited during the run); they compile
  ``parallel`` at a time, then time their jobs one after the other, so that no timing
  shares the cores. Returns the records and the library state each worker imported."""
  workers = [Worker(devices, jobs, args) for devices, jobs in plan if jobs]
  records: list[dict[str, Any]] = []
  try:
    for w in workers:
      w.library = w.read()["imported"]
    for i in range(0, len(workers), max(1, parallel)):
      batch = workers[i : i + max(1, parallel)]
      for w in batch:
        w.send("compile")
      for w in batch:
        w.read()
    for w in workers:
      w.send("time")
      records += w.read()["records"]
  finally:
    for w in workers:
      w.close()
  return records, [w.library for w in workers]


def split(jobs: Sequence[Job], parts: int) -> list[list[Job]]:
  """The jobs in ``parts`` lists of about equal compile time, every (mesh, depth, model)
  kept together (its optimizers are then timed back to back, in the same process)."""
  groups: dict[tuple[Any, ...], list[Job]] = {}
  for job in jobs:
    groups.setdefault((job.mesh, job.depth, job.model), []).append(job)
  out: list[list[Job]] = [[] for _ in range(max(1, parts))]
  load = [0.0] * len(out)
  cost = lambda group: len(group) * (1 + group[0].depth) * group[0].model.d_model / 64
  for group in sorted(groups.values(), key=cost, reverse=True):
    i = load.index(min(load))
    out[i] += group
    load[i] += cost(group)
  return [o for o in out if o]


def _env_devices() -> int:
  """The host device count the ``XLA_FLAGS`` of this process ask for (1 if none)."""
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith(DEVICE_FLAG + "="):
      return int(flag.split("=", 1)[1])
  return 1


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


# ---------------------------------------------------------------------------
# Driver.


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.sharded", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--depths", default="1,2", help="depths of every optimizer")
  p.add_argument(
    "--scaling-depths",
    default="4",
    help="more depths, SGD and Eva only (the depth scaling of Eva's extra)",
  )
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  p.add_argument("--meshes", default=",".join(MESHES), help=f"of {','.join(MESHES)}")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10, help="steps per round (whole periods)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--large-devices",
    default="64,256",
    help="device counts of the compile-only mesh-size check ('' for none)",
  )
  p.add_argument("--large-depths", default="1,2")
  p.add_argument(
    "--width-check",
    type=int,
    default=128,
    help="a second d_model (MLP 4x) for SGD and Eva on tp, compiled only (0: none)",
  )
  p.add_argument(
    "--no-gpt2-check",
    dest="gpt2_check",
    action="store_false",
    help="skip compiling the GPT-2-small-sized steps on the large meshes",
  )
  p.add_argument(
    "--workers",
    type=int,
    default=1,
    help="8-device worker processes compiling at once (XLA's compiler already "
    "uses several threads: on 2 cores 2 workers are slower)",
  )
  p.add_argument(
    "--in-process",
    action="store_true",
    help="measure the 8-device meshes in this process (its XLA_FLAGS must give "
    "8 devices); the default with --quick when they do",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="depth 1, SGD and Eva, mesh tp, 2 x 2 steps, no projection compile, nothing saved",
  )
  p.add_argument("--json", default=str(RESULTS / "sharded.json"))
  p.add_argument("--md", default=str(RESULTS / "sharded.md"))
  p.add_argument("--no-save", action="store_true")
  p.add_argument(
    "--reanalyse",
    metavar="JSON",
    default=None,
    help="no measurement: the analysis and tables again from a saved run's "
    "records (e.g. after a change of the projection's model)",
  )
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.depths, args.optimizers, args.meshes = "1", "sgd,eva", "tp"
    args.scaling_depths = ""
    args.warmup, args.rounds, args.steps = 1, 2, 2
    args.large_devices, args.width_check, args.no_save = "", 0, True
    args.in_process = args.in_process or _env_devices() >= DEVICES
  args.depths = _ints(args.depths)
  args.scaling_depths = [d for d in _ints(args.scaling_depths) if d not in args.depths]
  args.large_devices = _ints(args.large_devices)
  args.large_depths = _ints(args.large_depths)
  args.optimizers = [w.strip().lower() for w in args.optimizers.split(",") if w.strip()]
  if "sgd" not in args.optimizers:
    args.optimizers.insert(0, "sgd")  # the reference of every "extra" column
  args.meshes = [w.strip() for w in args.meshes.split(",") if w.strip()]
  from examples.harness import optimizers

  unknown = [k for k in args.optimizers if k not in optimizers.SPEC_BY_KEY]
  if unknown:
    p.error(f"--optimizers: unknown {unknown}")
  if set(args.meshes) - set(MESHES):
    p.error(f"--meshes: unknown {sorted(set(args.meshes) - set(MESHES))}")
  return args


def plan_jobs(args: argparse.Namespace) -> tuple[list[Job], dict[int, list[Job]], str]:
  """The jobs on 8 devices and, per larger device count, the compile-only ones; and a
  note on the large meshes left out (a dimension the mesh cannot divide)."""
  model = ModelConfig()
  jobs = [
    Job(k, d, MESHES[m], model, True)
    for m in args.meshes
    for d in args.depths
    for k in args.optimizers
  ]
  jobs += [
    Job(k, d, MESHES[m], model, True)
    for m in args.meshes
    for d in args.scaling_depths
    for k in ("sgd", "eva")
    if k in args.optimizers
  ]
  if args.width_check and "tp" in args.meshes and "eva" in args.optimizers:
    wide = ModelConfig(d_model=args.width_check, mlp_dim=4 * args.width_check)
    jobs += [
      Job(k, d, MESHES["tp"], wide, False) for d in args.large_depths for k in ("sgd", "eva")
    ]
  large: dict[int, list[Job]] = {}
  skipped = []
  for n in args.large_devices:
    for name, mesh in large_meshes(n).items():
      if name not in args.meshes:
        continue
      if mesh.rules == "fsdp" and model.d_model % mesh.shape[0]:
        skipped.append(f"{mesh.label} (d_model {model.d_model} is not a multiple of {n})")
        continue
      large.setdefault(n, []).extend(
        Job(k, d, mesh, model, False)
        for d in args.large_depths
        for k in ("sgd", "eva")
        if k in args.optimizers
      )
  if args.gpt2_check and "eva" in args.optimizers:
    a = Assumptions()
    for n in args.large_devices:
      if n in a.accelerators:
        large.setdefault(n, []).extend(
          Job(k, a.depth, a.mesh(n), a.model, False) for k in ("sgd", "eva")
        )
  note = ("Not compiled: " + "; ".join(skipped) + ".") if skipped else ""
  return jobs, large, note


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.worker is not None:
    worker(args.worker)
    return None
  if args.reanalyse:
    return reanalyse(args)
  start = time.perf_counter()
  jobs, large, note = plan_jobs(args)
  large_plan = list(large.items())  # compile only, one process per device count
  if args.in_process:
    import jax

    if jax.device_count() < DEVICES:
      raise SystemExit(
        f"--in-process: {jax.device_count()} devices, {DEVICES} wanted "
        f"(XLA_FLAGS={DEVICE_FLAG}={DEVICES})"
      )
    libraries = [_library_state()]
    local = Jobs(jobs)
    local.compile()
    records = local.time(args)
    if large_plan:
      more, seen = run_workers(large_plan, args)
      records += more
      libraries += seen
  else:
    parts = [(DEVICES, part) for part in split(jobs, args.workers)]
    records, libraries = run_workers(parts + large_plan, args, parallel=args.workers)
  report = {
    "benchmark": "sharded",
    "command": "python -m benchmarks.sharded"
    + (
      " " + " ".join(argv)
      if argv
      else " " + " ".join(sys.argv[1:])
      if argv is None and sys.argv[1:]
      else ""
    ),
    "machine": _machine_info(),
    "library": libraries[0],
    "library_changed_during_run": len({json.dumps(x, sort_keys=True) for x in libraries}) > 1,
    "settings": {
      "depths": args.depths,
      "scaling_depths": args.scaling_depths,
      "optimizers": args.optimizers,
      "meshes": args.meshes,
      "model": asdict(ModelConfig()),
      "warmup": args.warmup,
      "rounds": args.rounds,
      "steps": args.steps,
      "seed": args.seed,
      "large_devices": args.large_devices,
      "large_depths": args.large_depths,
      "width_check": args.width_check,
      "gpt2_check": args.gpt2_check,
      "learning_rate": LEARNING_RATE,
    },
    "total_s": time.perf_counter() - start,
    "records": records,
    "large_note": note,
  }
  report["command"] = report["command"].rstrip()
  analyse(report)
  _write(report, args)
  return report


def analyse(report: dict[str, Any]) -> None:
  """The report's analysis from its records: extra over SGD, Eva's breakdown, the mesh
  size check, the projection."""
  records = report["records"]
  add_extra(records)
  report["breakdown"] = eva_breakdown(records)
  report["mesh_check"] = mesh_size_check(records)
  settings = report["settings"]
  depths = len(settings["depths"]) + len(settings.get("scaling_depths", []))
  report["projection"] = projection(report["breakdown"], records) if depths > 1 else {}


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
  print()
  print(text_table(report["records"]))
  print()
  print(markdown(report))
  if not args.no_save:
    print(save_report(report, args.json, args.md, markdown(report)))


def reanalyse(args: argparse.Namespace) -> dict[str, Any]:
  """``--reanalyse``: a saved report's analysis and tables again, measurements unchanged."""
  report = json.loads(Path(args.reanalyse).read_text())
  analyse(report)
  _write(report, args)
  return report


def _library_state() -> dict[str, str]:
  """The commit, and a digest of the uncommitted changes to ``eva_optax`` (if any): the
  collectives measured are those of that code."""
  import hashlib

  def git(*command: str) -> str:
    try:
      return subprocess.run(
        ["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=30
      ).stdout
    except (OSError, subprocess.SubprocessError):
      return ""

  diff = git("diff", "HEAD", "--", "eva_optax")
  return {
    "commit": git("rev-parse", "HEAD").strip(),
    "eva_optax_uncommitted": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else "",
  }


def _machine_info() -> dict[str, Any]:
  """``examples.harness.report.machine_info`` without the devices (the workers own them)."""
  from examples.harness import report

  return report.machine_info(devices=False)


if __name__ == "__main__":
  main()
