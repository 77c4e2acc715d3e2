"""Sphinx configuration of eva_optax's documentation (``make docs``).

The pages are Markdown (MyST); the API reference comes from the docstrings
(``api.md``); the quickstart notebook is rendered as committed, never executed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eva_optax  # noqa: E402

project = "eva_optax"
author = "the eva_optax authors"
release = version = eva_optax.__version__

extensions = [
  "myst_nb",  # MyST Markdown and notebooks (it brings myst_parser)
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
]

# Only the pages of the site; README.md and ARCHITECTURE.md come in through {include}.
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebook is shown with its committed outputs
# Its setup cell has IPython lines (`!git clone`, `%pip install`), which the Python lexer
# highlights in its relaxed mode, with a warning.
suppress_warnings = ["misc.highlighting_failure"]

autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Short names in the signatures, not the unions optax's aliases stand for.
autodoc_type_aliases = {"optax.ScalarOrSchedule": "optax.ScalarOrSchedule"}
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a state's fields are documented once, by autodoc

html_theme = "furo"
html_title = f"eva_optax {release}"
