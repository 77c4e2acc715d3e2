"""The sharded benchmark's measurements and its worker processes: a job compiled on its mesh
(collectives, ops, state per device) and timed, in this process or in a worker with its own
host device count; the parent's side of the worker protocol (:class:`Worker`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from benchmarks.sharded_config import (
  DEVICE_FLAG,
  LEARNING_RATE,
  REPLY,
  ROOT,
  Job,
  MeshConfig,
  ModelConfig,
)

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
    kwargs = {}
    if spec.statistics is not None and spec.accepts("layouts"):
      abstract_capture = eva_optax.value_and_grad(
        loss_fn, statistics=spec.statistics, **dict(spec.capture_options)
      )
      kwargs["layouts"] = eva_optax.layouts_of(jax.eval_shape(abstract_capture, params, tokens)[2])
    tx = spec.build(LEARNING_RATE, optimizers.Options(), **kwargs)
    state_sharding = eva_optax.state_shardings(tx, params)
    state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(tx.init, params),
      state_sharding,
    )

  # What the step captures is read from the optimizer's state (none: a plain gradient).
  statistics = eva_optax.statistics_needed(state)
  gated = eva_optax.has_factor_gate(state)
  if statistics:
    grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics, **dict(spec.capture_options))

  def step(params: Any, state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
    with nn.logical_axis_rules(rules):
      if not statistics:
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
  _reply({"imported": library_state()})
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
    self.jobs = list(jobs)
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
    raise WorkerExited(self.devices, status)

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.process.stdin.close()
        self.process.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()


class WorkerExited(RuntimeError):
  """A worker ended before it answered; ``status`` is its exit status (negative: the
  signal that ended it)."""

  def __init__(self, devices: int, status: int):
    super().__init__(f"worker with {devices} devices exited (status {status})")
    self.devices, self.status = devices, status


def _timed(
  worker: Worker, args: argparse.Namespace, retries: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
  """``worker``'s records, timed. XLA's CPU collectives now and then stop at a rendezvous
  that never completes (the process aborts, status -SIGABRT, after its 40 s timeout); such
  a worker's jobs run again, up to ``retries`` times, in a fresh worker that must import
  the same library. Any other exit is raised as it is."""
  worker.send("time")
  try:
    return worker.read()["records"]
  except WorkerExited as e:
    if retries <= 0 or e.status != -signal.SIGABRT:
      raise
    log(f"{e}; its jobs run again in a fresh worker ({retries} more tries)")
  fresh = Worker(worker.devices, worker.jobs, args)
  try:
    fresh.library = fresh.read()["imported"]
    if fresh.library != worker.library:
      raise RuntimeError(
        f"the library changed during the run ({worker.library} -> {fresh.library}): "
        "its retry would not measure the same code"
      )
    fresh.send("compile")
    fresh.read()
    return _timed(fresh, args, retries - 1, log)
  finally:
    fresh.close()


def run_workers(
  plan: Sequence[tuple[int, Sequence[Job]]],
  args: argparse.Namespace,
  parallel: int = 1,
  retries: int = 2,
  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
  """``(devices, jobs)`` per worker. Every worker starts and imports the library at once
  (so all measure the same code, even if it is edited during the run); they compile
  ``parallel`` at a time, then time their jobs one after the other, so that no timing
  shares the cores. A worker aborted by a stuck collective of XLA's CPU runtime is
  retried (``retries`` times, see ``_timed``). Returns the records and the library state
  each worker imported."""
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
      records += _timed(w, args, retries, log)
  finally:
    for w in workers:
      w.close()
  return records, [w.library for w in workers]


def library_state() -> dict[str, str]:
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
