"""What a run writes and reads back: orbax checkpoints, and JSON that keeps its floats.

:func:`save_checkpoint` and :func:`restore_checkpoint` hold a run's arrays (parameters,
model state, optimizer state) and its JSON metadata, the latest epoch kept
(:class:`examples.harness.training.Trainer` resumes from them, and so does
``examples/sharded_lm.py``); :func:`jsonable` and :func:`from_json` carry tuples, paths and
non-finite floats through ``metrics.json`` and ``protocol.json``, and :func:`dumps` writes
them with one key per line but each list of numbers on one line (a run's per-step losses
would otherwise take a line per number).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _manager(directory: Path) -> Any:
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    directory.absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
  )


def save_checkpoint(
  directory: Path, epoch: int, arrays: dict[str, Any], meta: dict[str, Any]
) -> None:
  """Save ``arrays`` (params, model state, optimizer state) and JSON ``meta`` at ``epoch``."""
  import orbax.checkpoint as ocp

  with _manager(directory) as mgr:
    mgr.save(
      epoch,
      args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
    )


def restore_checkpoint(
  directory: Path, like: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """The latest ``(arrays, meta)`` saved in ``directory`` (shaped like ``like``), or None."""
  import orbax.checkpoint as ocp

  if not directory.exists():
    return None
  with _manager(directory) as mgr:
    epoch = mgr.latest_step()
    if epoch is None:
      return None
    restored = mgr.restore(
      epoch,
      args=ocp.args.Composite(arrays=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()),
    )
  return restored["arrays"], restored["meta"]


def jsonable(x: Any) -> Any:
  """Tuples as lists and non-finite floats as strings, as JSON gives them back."""
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [jsonable(v) for v in x]
  if isinstance(x, Path):
    return str(x)
  if isinstance(x, np.generic):
    return x.item()
  return x


def from_json(x: Any) -> Any:
  """Inverse of :func:`jsonable` for the floats: ``"nan"``/``"inf"`` back to floats."""
  if isinstance(x, str) and x in ("nan", "inf", "-inf"):
    return float(x)
  if isinstance(x, dict):
    return {k: from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [from_json(v) for v in x]
  return x


def dumps(x: Any) -> str:
  """``x`` as JSON text (through :func:`jsonable`): one key or nested item per line, indented
  by one space per level, and every list that holds no dict or list on a single line."""
  return _dumps(jsonable(x), 0) + "\n"


def _dumps(x: Any, depth: int) -> str:
  inner, outer = " " * (depth + 1), " " * depth
  if isinstance(x, dict) and x:
    items = (f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in x.items())
    return "{\n" + ",\n".join(items) + "\n" + outer + "}"
  if isinstance(x, list) and any(isinstance(v, dict | list) for v in x):
    return "[\n" + ",\n".join(inner + _dumps(v, depth + 1) for v in x) + "\n" + outer + "]"
  return json.dumps(x)
