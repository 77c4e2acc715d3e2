"""The sharded-mesh benchmark: its ``--quick`` run (in this process, 8 host devices), the
replica-group parse of the compiled programs, and the α-β projection's arithmetic."""

from __future__ import annotations

import math

import jax
import pytest

from benchmarks import sharded_analysis, sharded_config, sharded_worker
from examples.harness import compiled_ops

DEVICES = 8


@pytest.fixture(scope="module")
def sharded():
  from benchmarks import sharded

  return sharded


@pytest.fixture(scope="module")
def quick(sharded):
  if jax.device_count() < DEVICES:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return sharded.main(["--quick"])


def _record(report, optimizer):
  return next(r for r in report["records"] if r["optimizer"] == optimizer)


def test_quick_structure(quick, sharded):
  assert quick["settings"]["depths"] == [1]
  assert quick["settings"]["meshes"] == ["tp"]
  assert [r["optimizer"] for r in quick["records"]] == ["sgd", "eva"]
  for r in quick["records"]:
    assert "error" not in r, r.get("error")
    assert r["mesh_shape"] == [2, 4] and r["devices"] == DEVICES
    assert r["total_ops"] > 0 and r["step_ms"] > 0 and r["loss_finite"]
    assert r["by_kind"]["total"]["count"] == len(r["collectives"]) > 0
    assert {c["axes"] for c in r["collectives"]} <= {"data", "model", "data+model"}
    # 2 x 4 devices: a parameter is replicated at most 8 times, and SGD's momentum is
    # sharded like the parameters (the heads, the MLP and the vocabulary over 4)
    assert 1 <= r["state"]["ratio"] <= DEVICES
  assert _record(quick, "sgd")["state"]["ratio"] < 4
  md = sharded.markdown(quick)
  assert md.startswith("## Sharded meshes") and "python -m benchmarks.sharded --quick" in md


def test_quick_eva_over_sgd(quick):
  sgd, eva = _record(quick, "sgd"), _record(quick, "eva")
  assert sgd["extra"]["total"] == {"count": 0, "bytes": 0}
  # Eva's statistics and its packed per-layer scalars: a few collectives at most
  assert 1 <= eva["extra"]["total"]["count"] <= 8
  assert 0 < eva["extra"]["total"]["bytes"] < 0.1 * sgd["by_kind"]["total"]["bytes"]
  assert eva["state"]["per_device"] < 1.2 * sgd["state"]["per_device"]
  # the extra all-reduced floats are the statistics of the 7 preconditioned layers on one
  # device plus 6 scalars per layer, over the whole mesh
  (row,) = quick["breakdown"]["rows"]
  assert row["match"], row
  assert round(quick["breakdown"]["scalars_per_layer"]) == 6
  assert row["classes"]["all-reduce@data+model"]["count"] == 1


def test_replica_group_formats():
  assert compiled_ops.replica_group("x replica_groups={{0,4},{1,5}}, y", 8) == [0, 4]
  assert compiled_ops.replica_group("x replica_groups={}, y", 4) == [0, 1, 2, 3]
  assert compiled_ops.replica_group("x replica_groups=[2,4]<=[8], y", 8) == [0, 1, 2, 3]
  assert compiled_ops.replica_group("x replica_groups=[4,2]<=[2,4]T(1,0), y", 8) == [0, 4]
  mesh = "x replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, y"
  assert compiled_ops.replica_group(mesh, 8) == [0, 4]
  mesh = "x replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, y"
  assert compiled_ops.replica_group(mesh, 8) == [0, 1, 2, 3]
  pairs = "x source_target_pairs={{0,1},{1,0}}, y"
  assert compiled_ops.replica_group(pairs, 8) == [0, 1]


def test_axes_and_splits(sharded):
  assert sharded_worker._axes([0, 4], (2, 4)) == "data"
  assert sharded_worker._axes([0, 1, 2, 3], (2, 4)) == "model"
  assert sharded_worker._axes(list(range(8)), (2, 4)) == "data+model"
  jobs, large, _ = sharded.plan_jobs(sharded.parse_args(["--large-devices", "64"]))
  parts = sharded_config.split(jobs, 2)
  assert sorted(map(id, sum(parts, []))) == sorted(map(id, jobs))
  assert all(j.mesh.shape == (2, 4) or j.model == sharded_config.ModelConfig() for j in jobs)
  assert {j.mesh.shape for j in large[64]} >= {(64, 1), (8, 8), (16, 4)}


def test_statistics_and_projection():
  small = sharded_config.ModelConfig()
  # d_model 64, 8 heads, MLP 256, vocabulary 64, on one device: (in + out) of q, k, v, out
  # (64 + 64 each), up and down (64 + 256), the head (64 + 64)
  assert sharded_analysis.statistics_floats(small, 1, 1) == 4 * 128 + 2 * 320 + 128
  replicated, shard = sharded_analysis.statistics_parts(small, 1, 4)
  assert (replicated, shard) == (7 * 64, 4 * 16 + 2 * 64 + 16)
  assert sharded_analysis.ring_factor("all-reduce", 8) == pytest.approx(1.75)
  assert sharded_analysis.ring_factor("all-gather", 4) == pytest.approx(0.75)
  a = sharded_analysis.Assumptions()
  part = sharded_analysis.class_time("all-reduce@data+model", 1, 1752, 64, a)
  assert part["group"] == 64 and part["link"] == a.inter.name
  assert part["ms"] == pytest.approx(1e3 * (30e-6 + 2 * 63 / 64 * 1752 / 25e9))
  assert sharded_analysis.class_time("all-gather@model", 1, 1e6, 64, a)["group"] == a.model_axis
  classes = {"all-reduce@data": {"count": 0}, "all-reduce@data+model": {"count": 1}}
  breakdown = {
    "scalars_per_layer": 6.0,
    "rows": [{"mesh_shape": [2, 4], "vocab": 64, "classes": classes}],
  }
  p = sharded_analysis.projection(breakdown, [])
  n64 = p["meshes"][0]
  assert n64["accelerators"] == 64 and n64["mesh"].startswith("data 16")
  (scaled,) = n64["estimates"]
  parts = {q["class"]: q for q in scaled["parts"]}
  assert set(parts) == {"all-reduce@data", "all-reduce@data+model"}
  # +0: inside SGD's all-reduce, bandwidth only (16 data shards across hosts)
  stats = 4 * sharded_analysis.statistics_floats(a.model, a.depth, a.model_axis)
  assert parts["all-reduce@data"]["ms"] == pytest.approx(1e3 * 2 * 15 / 16 * stats / 25e9)
  assert scaled["extra_ms"] == pytest.approx(sum(q["ms"] for q in scaled["parts"]))
  classes["all-gather@data+model"] = {"count": 2}
  (scaled,) = sharded_analysis.projection(breakdown, [])["meshes"][0]["estimates"]
  (gathers,) = [q for q in scaled["parts"] if q["class"] == sharded_analysis.GATHERS]
  assert gathers["extra_collectives"] == 2
  assert gathers["bytes"] == 4 * sharded_analysis.statistics_floats(a.model, a.depth, 1)
  # GPT-2 small: 6 x 12 x 768^2 x 2 + 768 x 50304 matmul weights → ~0.85 GFLOP per token
  assert 0.8e9 < sharded_analysis.model_flops_per_token(a.model, a.depth) < 0.9e9
  assert math.isclose(n64["sgd_ms"] * 4, p["meshes"][1]["sgd_ms"] * 16)


class _ScriptedWorker:
  """Stands in for a worker subprocess: each new worker takes the next exit status (None:
  it answers its records) from ``exits``."""

  exits: list = []
  started = 0
  commits = ""

  def __init__(self, devices, jobs, args):
    type(self).started += 1
    self.devices, self.jobs, self.library = devices, jobs, {}
    self.number, self.sent = type(self).started, None
    self.exit = type(self).exits.pop(0)

  def send(self, line):
    self.sent = line

  def read(self):
    if self.sent is None:
      return {"imported": {"commit": type(self).commits[self.number - 1]}}
    if self.sent == "compile":
      return {"ready": len(self.jobs)}
    if self.exit is not None:
      raise sharded_worker.WorkerExited(self.devices, self.exit)
    return {"records": [{"job": j, "worker": self.number} for j in self.jobs]}

  def close(self):
    pass


@pytest.fixture
def scripted(monkeypatch):
  """``scripted(exits, commits)``: run_workers' workers are _ScriptedWorkers that exit
  with ``exits`` in turn and import the library at ``commits`` in turn."""

  def script(exits, commits="cccc"):
    monkeypatch.setattr(sharded_worker, "Worker", _ScriptedWorker)
    monkeypatch.setattr(_ScriptedWorker, "exits", list(exits))
    monkeypatch.setattr(_ScriptedWorker, "started", 0)
    monkeypatch.setattr(_ScriptedWorker, "commits", commits)

  return script


@pytest.mark.parametrize(
  "exits, retried",
  [
    ([None], 0),  # nothing to retry
    ([-6, None], 1),  # aborted once: a fresh worker's records
    ([-6, -6, None], 2),  # twice: the last of the two retries
  ],
)
def test_a_worker_aborted_by_a_stuck_collective_runs_again(scripted, exits, retried):
  scripted(exits)
  logged = []
  records, libraries = sharded_worker.run_workers([(8, ["a", "b"])], None, log=logged.append)
  assert records == [{"job": "a", "worker": 1 + retried}, {"job": "b", "worker": 1 + retried}]
  assert libraries == [{"commit": "c"}] and _ScriptedWorker.started == 1 + retried
  assert len(logged) == retried and all("status -6" in m for m in logged)


@pytest.mark.parametrize("exits", [[1], [-9], [-6, -6, -6]])
def test_other_exits_and_a_third_abort_are_raised(scripted, exits):
  scripted(exits)
  with pytest.raises(sharded_worker.WorkerExited, match=f"status {exits[-1]}"):
    sharded_worker.run_workers([(8, ["a"])], None, log=lambda m: None)
  assert _ScriptedWorker.started == len(exits)


def test_a_retry_refuses_a_library_changed_since(scripted):
  scripted([-6, None], commits="cd")
  with pytest.raises(RuntimeError, match="library changed during the run"):
    sharded_worker.run_workers([(8, ["a"])], None, log=lambda m: None)
