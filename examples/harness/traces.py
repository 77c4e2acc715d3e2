"""Reading a ``jax.profiler`` trace of a compiled step: which of its events are the step's
operations, and of what kind.

:func:`instruction_kinds` names the operations a compiled step launches
(:func:`examples.harness.compiled_ops.launched`) with their kind
(:data:`examples.harness.compiled_ops.KINDS`); :func:`trace_events` reads the operation
events of an ``.xplane.pb`` file (``jax.profiler.ProfileData``): a device's "XLA Ops" line,
else its kernel streams, else the events of XLA:CPU's threads named after an operation of
the step. The step-time benchmark's ``--profile`` sums them per step.
"""

from __future__ import annotations

from typing import Any

import jax

from examples.harness import compiled_ops


def instruction_kinds(compiled: Any) -> dict[str, str]:
  """``{instruction name: kind}`` of the operations a compiled step launches."""
  instructions, found = compiled_ops.launched(compiled.as_text())
  kinds = {}
  for i in instructions:
    name = i.text.split("=", 1)[0].strip().removeprefix("ROOT").strip().lstrip("%")
    kinds[name] = kinds[name.replace(".", "_")] = compiled_ops.kind(i, found)
  return kinds  # also under the kernel-name spelling, "." as "_"


def trace_events(path: str, kinds: dict[str, str]) -> tuple[str, list[tuple[str, float]]]:
  """The operation events of an ``.xplane.pb``: where they come from, and (name, ns).

  On a device: its "XLA Ops" line, else its kernel streams. On the CPU: the events of
  XLA:CPU's threads named after an operation of the step (``kinds``).
  """
  data = jax.profiler.ProfileData.from_file(path)
  planes = list(data.planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  for plane in device:  # the device's HLO-op line, where there is one
    for line in plane.lines:
      if line.name == "XLA Ops":
        return f"{plane.name} XLA Ops", [(e.name, e.duration_ns) for e in line.events]
  events = [
    (e.name, e.duration_ns)
    for plane in device
    for line in plane.lines
    if line.name.startswith("Stream")
    for e in line.events
  ]
  if events:
    return "device kernel streams", events
  events = [
    (e.name, e.duration_ns)
    for plane in planes
    if plane.name == "/host:CPU"
    for line in plane.lines
    if "XLAPjRtCpuClient" in line.name or "XLAEigen" in line.name
    for e in line.events
    if e.name in kinds
  ]
  return "XLA:CPU threads", events
