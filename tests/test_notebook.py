"""notebooks/quickstart.ipynb runs end to end in a fresh kernel (nbclient).

With Fashion-MNIST installed the notebook runs as shipped (6000 training images);
without it, the test writes tiny IDX files and points the notebook at them through
``EVA_OPTAX_DATA`` (and caps the subset with ``EVA_OPTAX_NOTEBOOK_LIMIT``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from examples.harness import datasets
from data_files import write_split

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 180
RESULT = re.compile(
  r"^(?P<name>\S+)\s+final training loss (?P<loss>\S+)\s+test accuracy (?P<acc>\S+)",
  re.MULTILINE,
)


def _has_real_data() -> bool:
  try:
    for split in ("train", "test"):
      datasets.find_fashion_mnist(split, download=False)
  except FileNotFoundError:
    return False
  return True


def _stdout(nb: nbformat.NotebookNode) -> str:
  return "".join(
    out.get("text", "")
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.outputs
    if out.output_type == "stream" and out.name == "stdout"
  )


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  # A kernel on this interpreter, whatever kernelspecs the user has installed.
  spec_dir = tmp_path / "jupyter" / "kernels" / "eva-optax-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eva_optax test",
        "language": "python",
      }
    )
  )
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # The suite's eight fake CPU devices (conftest) are not what a notebook user has.
  xla_flags = " ".join(
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  )
  monkeypatch.setenv("XLA_FLAGS", xla_flags)

  real_data = _has_real_data()
  if not real_data:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_split(data_dir, "train", 512, compress=True)
    write_split(data_dir, "test", 128, compress=False)
    monkeypatch.setenv(datasets.ENV_VAR, str(data_dir))
    monkeypatch.setenv("EVA_OPTAX_NOTEBOOK_LIMIT", "512")

  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="eva-optax-test",
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  elapsed = time.perf_counter() - start

  out = _stdout(nb)
  results = {m["name"]: (float(m["loss"]), float(m["acc"])) for m in RESULT.finditer(out)}
  assert set(results) == {"SGD", "Eva", "Eva-s"}, out
  for name, (loss, acc) in results.items():
    assert math.isfinite(loss), f"{name}: final training loss {loss}\n{out}"
    assert 0.0 <= acc <= 1.0
  if real_data:  # 3 epochs on 6000 images: every optimizer is well past chance (loss 2.30)
    for name, (loss, acc) in results.items():
      assert loss < 1.0 and acc > 0.6, (name, loss, acc)
  assert "preconditioned" in out  # eva_optax.describe was shown
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if "image/png" in o.get("data", {})
  ]
  assert len(images) == 2  # the SGD/Eva plot, then with Eva-s added
  print(f"notebook ran in {elapsed:.1f} s; {results}")
