"""Saving a benchmark's report: its JSON record and its markdown, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_report(report: dict[str, Any], json_path: str | Path, md_path: str | Path, md: str) -> str:
  """Write ``report`` as JSON to ``json_path`` and ``md`` to ``md_path`` (folders made
  as needed); returns the line that says where."""
  json_path, md_path = Path(json_path), Path(md_path)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  md_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(report, indent=2) + "\n")
  md_path.write_text(md)
  return f"wrote {json_path} and {md_path}"
