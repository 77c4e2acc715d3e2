"""The sharded benchmark's settings: the meshes, the decoder's size, one job, and the split of
the jobs over worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Job:
  """One measurement of a worker."""

  optimizer: str
  depth: int
  mesh: MeshConfig
  model: ModelConfig
  run: bool


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
