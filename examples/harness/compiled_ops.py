"""Counting the operations of a compiled step: a load-independent cost measure.

On an accelerator a small training step is bound by kernel launches, not FLOPs: every
top-level operation of the compiled program's entry computation (a fusion, a dot, a
convolution, a copy, a collective) is one launch. :func:`count_ops` reads them from
``jax.jit(step).lower(...).compile().as_text()`` on whatever backend is present, so the
count of Eva's step can be compared with SGD's on the same model without timing anything.

Counted: every instruction of the ``ENTRY`` computation except those that do no work
(``parameter``, ``constant``, ``get-tuple-element``, ``tuple``, ``bitcast``, ``after-all``).
A ``call`` is replaced by the instructions of the computation it calls (XLA's GPU
compiler outlines runs of kernels into ``call``\\ s of command-buffer computations, which
launch the same kernels as one CUDA graph); ``while`` and ``conditional`` count as one.

:func:`count_kinds` sorts the same instructions into five kinds: ``dot`` (a ``dot``, a
GEMM library call such as ``__cublas$gemm``, or a fusion around a dot: XLA:CPU's
``__ynn_fusion``, XLA:GPU's Triton GEMMs), ``convolution`` (likewise, with cuDNN's
calls), ``fusion`` (every other fusion), ``copy`` (``copy``, ``copy-start``,
``copy-done``) and ``other``.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, NamedTuple

#: Entry-computation instructions that launch nothing.
NO_WORK = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"})

#: The kinds of :func:`count_kinds`, in the order of a table's columns.
KINDS = ("fusion", "dot", "convolution", "copy", "other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


class Instruction(NamedTuple):
  """One instruction of an HLO computation: its opcode and its line of text."""

  opcode: str
  text: str


def computations(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """The instructions of every computation of an HLO module's text, and the entry's name."""
  found: dict[str, list[Instruction]] = {}
  entry = None
  current: list[Instruction] | None = None
  for line in hlo_text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current = found.setdefault(header.group(2), [])
        if header.group(1):
          entry = header.group(2)
      continue
    if line.startswith("}"):
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      current.append(Instruction(match.group(1), line))
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text")
  return found, entry


def entry_opcodes(hlo_text: str) -> list[str]:
  """The opcodes of the ``ENTRY`` computation of an HLO module's text, in order."""
  found, entry = computations(hlo_text)
  return [i.opcode for i in found[entry]]


def _callee(instruction: Instruction) -> str | None:
  match = _CALLS.search(instruction.text)
  return match.group(1) if match else None


def launched(hlo_text: str) -> tuple[list[Instruction], dict[str, list[Instruction]]]:
  """The entry's instructions that do work (``call``\\ s replaced by their callees'),
  and every computation of the module (for :func:`kind`)."""
  found, entry = computations(hlo_text)
  out: list[Instruction] = []

  def visit(name: str, depth: int) -> None:
    for instruction in found.get(name, []):
      callee = _callee(instruction)
      if instruction.opcode == "call" and callee in found and depth < 16:
        visit(callee, depth + 1)
      elif instruction.opcode not in NO_WORK:
        out.append(instruction)

  visit(entry, 0)
  return out, found


def _text(compiled: Any) -> str:
  return compiled if isinstance(compiled, str) else compiled.as_text()


def count_ops(compiled: Any) -> collections.Counter:
  """Operations that do work in a compiled function, by opcode.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args).compile()``) or its
      ``as_text()``.

  Returns:
    A ``Counter`` ``{opcode: count}``; ``sum(counter.values())`` is the number of
    top-level operations (kernel launches on a GPU).
  """
  return collections.Counter(i.opcode for i in launched(_text(compiled))[0])


def total_ops(compiled: Any) -> int:
  """The number of top-level operations of a compiled function (:func:`count_ops`)."""
  return sum(count_ops(compiled).values())


def _contains(found: dict[str, list[Instruction]], name: str | None, opcode: str) -> bool:
  seen, todo = set(), [name]
  while todo:
    current = todo.pop()
    if current is None or current in seen or current not in found:
      continue
    seen.add(current)
    for instruction in found[current]:
      if instruction.opcode == opcode:
        return True
      todo.append(_callee(instruction))
  return False


def kind(instruction: Instruction, found: dict[str, list[Instruction]]) -> str:
  """The kind (one of :data:`KINDS`) of a top-level instruction."""
  op = instruction.opcode
  if op in ("dot", "convolution"):
    return op
  if op in ("copy", "copy-start", "copy-done"):
    return "copy"
  if op == "custom-call":
    match = _TARGET.search(instruction.text)
    target = match.group(1).lower() if match else ""
    if "conv" in target:
      return "convolution"
    if any(word in target for word in ("gemm", "matmul", "cublas")):
      return "dot"
    return "other"
  if op == "fusion":
    callee = _callee(instruction)
    if _contains(found, callee, "convolution"):
      return "convolution"
    if _contains(found, callee, "dot"):
      return "dot"
    return "fusion"
  return "other"


def count_kinds(compiled: Any) -> collections.Counter:
  """The operations of :func:`count_ops` by kind (:data:`KINDS`), every kind present."""
  instructions, found = launched(_text(compiled))
  counts = collections.Counter({k: 0 for k in KINDS})
  counts.update(kind(i, found) for i in instructions)
  return counts


def op_summary(compiled: Any) -> dict[str, Any]:
  """The top-level operations of a compiled step: ``total``, ``by_opcode`` (most common
  first, :func:`count_ops`) and ``by_kind`` (:func:`count_kinds`)."""
  by_opcode = count_ops(compiled)
  return {
    "total": sum(by_opcode.values()),
    "by_opcode": dict(by_opcode.most_common()),
    "by_kind": dict(count_kinds(compiled)),
  }


def xla_cost(compiled: Any) -> dict[str, float]:
  """XLA's static cost estimate of a compiled step (of one device's program; nothing is
  timed): ``gflop`` (``flops`` / 10^9) and ``mb_accessed`` (``bytes accessed`` / 10^6) of
  ``compiled.cost_analysis()``; ``{}`` where the backend provides none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend provides one
    return {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return {
    "gflop": float(analysis.get("flops", 0.0)) / 1e9,
    "mb_accessed": float(analysis.get("bytes accessed", 0.0)) / 1e6,
  }


#: The opcodes of collectives (an async pair ``*-start``/``*-done`` counts once, as its start).
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _elements_and_bytes(instruction: Instruction) -> tuple[int, int]:
  """Elements and bytes of the result shape(s) of one instruction."""
  result = instruction.text.split("=", 1)[1]
  result = result[: result.index(f" {instruction.opcode}(")]
  elements = nbytes = 0
  for dtype, dims in _SHAPE.findall(result):
    n = math.prod(int(d) for d in dims.split(",") if d)
    width = _BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
    elements += n
    nbytes += n * width
  return elements, nbytes


class Collective(NamedTuple):
  """One collective of a compiled program: its kind and the size of its result."""

  kind: str
  elements: int
  bytes: int


def collectives(compiled: Any) -> list[Collective]:
  """Every collective of a compiled program (all its computations: a collective inside a
  ``while`` or a ``conditional`` counts once), with the size of its result per device."""
  found, _ = computations(_text(compiled))
  out = []
  for instructions in found.values():
    for instruction in instructions:
      op = instruction.opcode.removesuffix("-start")
      if op in COLLECTIVES and not instruction.opcode.endswith("-done"):
        out.append(Collective(op, *_elements_and_bytes(instruction)))
  return out


def count_collectives(compiled: Any) -> collections.Counter:
  """The collectives of :func:`collectives` by kind, every kind present."""
  counts = collections.Counter({k: 0 for k in COLLECTIVES})
  counts.update(c.kind for c in collectives(compiled))
  return counts


# ---------------------------------------------------------------------------------- groups

_GROUPS = re.compile(
  r"replica_groups=(\{\{[\d,{} ]*\}\}|\{\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?"
  r"|mesh\[[^\]]*\]\s*\{[^}]*\})"
)
_PAIRS = re.compile(r"source_target_pairs=\{([\d,{} ]*)\}")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")


def _iota_group(spec: str) -> list[int]:
  """The first group of an iota list ``[G,S]<=[d0,d1,...]T(perm)``."""
  import numpy as np

  match = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
  shape = [int(x) for x in match.group(1).split(",")]
  ids = np.arange(math.prod(int(x) for x in match.group(2).split(",")))
  ids = ids.reshape([int(x) for x in match.group(2).split(",")])
  if match.group(3):
    ids = ids.transpose([int(x) for x in match.group(3).split(",")])
  return [int(i) for i in ids.reshape(shape[0], -1)[0]]


def _mesh_group(spec: str) -> list[int]:
  """The first group of a mesh list ``mesh['a'=2,'b'=4] {'a'}`` (device ids in the mesh's
  row-major order; a sub-axis ``'a':(pre)size`` varies the middle part of ``a``)."""
  import numpy as np

  sizes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", spec)]
  chosen = spec[spec.rindex("{") :]
  shape: list[int] = []
  varying: list[bool] = []
  for name, size in sizes:
    sub = re.search(rf"'{re.escape(name)}'(?::\((\d+)\)(\d+))?", chosen)
    if sub is None:
      shape.append(size)
      varying.append(False)
    elif sub.group(1) is None:
      shape.append(size)
      varying.append(True)
    else:
      pre, mid = int(sub.group(1)), int(sub.group(2))
      shape += [pre, mid, size // (pre * mid)]
      varying += [False, True, False]
  ids = np.arange(math.prod(shape)).reshape(shape)
  index = tuple(slice(None) if v else 0 for v in varying)
  return [int(i) for i in ids[index].reshape(-1)]


def replica_group(text: str, num_devices: int) -> list[int]:
  """The devices (ids in the program's device assignment) of the first group of a collective
  instruction's text: every group of a collective has the same size, so this is the size of
  its group and, on a mesh, the mesh axes it spans. ``replica_groups={}`` is every device;
  a ``collective-permute`` is the devices of its source-target pairs."""
  pairs = _PAIRS.search(text)
  if pairs:
    return sorted({int(i) for i in re.findall(r"\d+", pairs.group(1))})
  match = _GROUPS.search(text)
  if match is None or match.group(1) == "{}":
    return list(range(num_devices))
  spec = match.group(1)
  if spec.startswith("{{"):
    return [int(i) for i in re.findall(r"\d+", spec[2 : spec.index("}")])]
  if spec.startswith("["):
    return _iota_group(spec)
  return _mesh_group(spec)


class GroupedCollective(NamedTuple):
  """A :class:`Collective` and the devices of its first replica group."""

  kind: str
  elements: int
  bytes: int
  group: tuple[int, ...]


def grouped_collectives(compiled: Any) -> list[GroupedCollective]:
  """:func:`collectives` with the first replica group of each (:func:`replica_group`); the
  number of devices is the module's ``num_partitions`` (1 if it does not say)."""
  text = _text(compiled)
  match = _PARTITIONS.search(text.split("\n", 1)[0])
  num_devices = int(match.group(1)) if match else 1
  found, _ = computations(text)
  out = []
  for instructions in found.values():
    for instruction in instructions:
      op = instruction.opcode.removesuffix("-start")
      if op in COLLECTIVES and not instruction.opcode.endswith("-done"):
        out.append(
          GroupedCollective(
            op,
            *_elements_and_bytes(instruction),
            tuple(replica_group(instruction.text, num_devices)),
          )
        )
  return out
