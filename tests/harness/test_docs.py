"""The documentation site and the one learning-rate rule of its examples.

* ``make docs``'s build (Sphinx, MyST, the notebook rendered without running it)
  succeeds with warnings as errors, and the API page documents every name of
  ``eva_optax.__all__``. It needs the ``docs`` extra, which ``make install`` (and
  so ``make test``) installs; without it that test is skipped, saying so.
* Eva's learning rate in every documented example follows the README's rule:
  **SGD's rate / 10**. A literal ``eva(<rate>)`` is SGD's rate in the same line
  / 10 where that line names one (``optax.sgd(<rate>``), else the documented
  example rate 0.01 (SGD's usual 0.1 / 10); the notebook and ``make demo`` derive
  Eva's rate from SGD's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eva_optax

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
BUILD_TIMEOUT_S = 300

#: SGD's usual rate in the examples, and Eva's from the rule.
SGD_RATE = 0.1
RULE = 10
EXAMPLE_RATE = SGD_RATE / RULE

#: ``eva(`` or ``eva_optax.eva(`` (not ``scale_by_eva(``, ``eva_foof(``, …) and its first argument.
EVA_CALL = re.compile(r"(?:\beva_optax\.|(?<![\w.]))eva\(\s*([^,)\s]+)")
SGD_CALL = re.compile(r"\bsgd\(\s*([0-9][0-9.eE+-]*)")
#: First arguments that are not a rate written out: a name the text defines, or an ellipsis.
SYMBOLIC = {"lr", "learning_rate", "...", "EVA_LR"}


def _missing_docs_tools() -> list[str]:
  return [
    m for m in ("sphinx", "myst_nb", "myst_parser", "furo") if importlib.util.find_spec(m) is None
  ]


def test_the_docs_build_without_warnings_and_list_every_public_name(tmp_path):
  missing = _missing_docs_tools()
  if missing:
    pytest.skip(
      f"the docs extra is not installed ({', '.join(missing)} missing): "
      "pip install -e '.[docs]', or make install"
    )
  out = tmp_path / "html"
  start = time.perf_counter()
  build = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-q",
      "-b",
      "html",
      "-d",
      str(tmp_path / "doctrees"),
      str(DOCS),
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=BUILD_TIMEOUT_S,
  )
  seconds = time.perf_counter() - start
  assert build.returncode == 0, (
    f"sphinx failed after {seconds:.0f} s:\n{build.stdout}\n{build.stderr}"
  )
  api = (out / "api.html").read_text(encoding="utf-8")
  undocumented = [n for n in eva_optax.__all__ if f'id="eva_optax.{n}"' not in api]
  assert not undocumented, f"api.html documents no {undocumented}"
  for page in (
    "index",
    "getting_started",
    "settings",
    "optimizers",
    "layers",
    "multi_device",
    "results",
    "conventions",
    "examples",
    "architecture",
    "quickstart",
  ):
    assert (out / f"{page}.html").is_file(), page
  index = (out / "index.html").read_text(encoding="utf-8")
  assert "Should I use Eva?" in index and 'href="getting_started.html"' in index


# ----------------------------------------------------------------------------- the rate rule


def _documented_texts() -> dict[str, str]:
  """{where: text} of the README, the guides, ARCHITECTURE.md, the library's
  docstrings (its sources: the library itself never calls ``eva`` with a number)
  and the notebook's cells."""
  texts = {
    "README.md": (ROOT / "README.md").read_text(encoding="utf-8"),
    "ARCHITECTURE.md": (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"),
  }
  for page in sorted(DOCS.glob("*.md")):
    texts[f"docs/{page.name}"] = page.read_text(encoding="utf-8")
  for source in sorted((ROOT / "eva_optax").rglob("*.py")):
    texts[source.relative_to(ROOT).as_posix()] = source.read_text(encoding="utf-8")
  for i, cell in enumerate(json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]):
    texts[f"notebooks/quickstart.ipynb cell {i}"] = "".join(cell["source"])
  return texts


def rate_rule_violations(texts: dict[str, str]) -> list[str]:
  """Every ``eva(<rate>`` of ``texts`` that breaks the rule, as ``where:line: text``."""
  bad = []
  for where, text in texts.items():
    for number, line in enumerate(text.splitlines(), 1):
      for match in EVA_CALL.finditer(line):
        arg = match.group(1)
        if arg in SYMBOLIC:
          continue
        try:
          rate = float(arg)
        except ValueError:
          bad.append(
            f"{where}:{number}: {arg!r} is neither a rate nor a known name: {line.strip()}"
          )
          continue
        sgd = SGD_CALL.search(line)
        expected = float(sgd.group(1)) / RULE if sgd else EXAMPLE_RATE
        if not math.isclose(rate, expected, rel_tol=1e-9):
          bad.append(
            f"{where}:{number}: eva({arg}) where the rule gives {expected:g}: {line.strip()}"
          )
  return bad


def test_the_rule_checker_catches_a_wrong_rate():
  assert rate_rule_violations({"a": "tx = eva_optax.eva(0.01, momentum=0.9)"}) == []
  assert rate_rule_violations({"a": "eva(0.06)  # was: optax.sgd(0.6)"}) == []
  assert rate_rule_violations({"a": "eva_optax.scale_by_eva(0.3); eva_foof(0.6); eva(lr)"}) == []
  assert len(rate_rule_violations({"a": "tx = eva_optax.eva(0.1, momentum=0.9)"})) == 1
  assert len(rate_rule_violations({"a": "eva(0.1)  # was: optax.sgd(0.1)"})) == 1


def test_every_documented_example_uses_sgds_rate_over_ten():
  texts = _documented_texts()
  assert rate_rule_violations(texts) == []
  calls = sum(len(EVA_CALL.findall(t)) for t in texts.values())
  assert calls >= 8  # the README, the guides, the docstrings and the notebook all show some
  readme = texts["README.md"]
  assert "start at SGD's rate / 10" in readme


def test_the_notebook_derives_evas_rate_from_sgds():
  cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
  code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  assert re.search(r"^EVA_LR = SGD_LR / 10\b", code, re.MULTILINE)
  assert "optax.sgd(lr, momentum=0.9)" in code and "around(SGD_LR)" in code
  # Eva's candidates are the rule's rate and a factor 3 either side of it.
  assert re.findall(r"eva_optax\.eva\(\s*(\w+)", code) == ["lr"]
  assert re.findall(r"around\(([A-Z_]+)\)", code) == ["SGD_LR", "ADAMW_LR", "EVA_LR", "SGD_LR"]


def test_architecture_names_every_library_module():
  """ARCHITECTURE.md's table places every module of ``eva_optax/_src`` in a layer."""
  text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
  modules = sorted(p for p in (ROOT / "eva_optax" / "_src").rglob("*.py") if p.stem != "__init__")
  assert len(modules) > 30
  missing = [p.relative_to(ROOT).as_posix() for p in modules if f"`{p.name}`" not in text]
  assert missing == []
