"""The generated blocks of the README: the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``, replaced by a benchmark's ``--readme``."""

from __future__ import annotations

from pathlib import Path


def replace_block(text: str, name: str, block: str) -> str:
  """``text`` with the part between the ``name`` markers replaced by ``block``."""
  start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
  i, j = text.find(start), text.find(end)
  if i < 0 or j < i:
    raise SystemExit(f"no {start} ... {end} block to replace")
  return text[: i + len(start)] + "\n" + block + text[j:]


def update(path: Path, name: str, block: str) -> None:
  """Replace the ``name`` block of the file ``path`` with ``block``."""
  path.write_text(replace_block(path.read_text(), name, block))
