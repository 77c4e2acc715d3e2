# eva_optax developer tasks. Needs only python3 and make; everything else goes into .venv.
#
#   make install   create .venv and install the package with the test, example and docs extras
#   make data      locate Fashion-MNIST (installs the Debian package when run as root)
#   make test      lint and format check (ruff), then the test suite (slow convergence runs
#                  excluded; it builds the docs too)
#   make lint      only the ruff check and format check
#   make docs      build the documentation site into docs/_build/html (warnings are errors)
#   make demo      Fashion-MNIST autoencoder: SGD, AdamW, Eva, Eva-f, Eva-s, K-FAC, Shampoo (results/demo)
#   make bench     the tests marked slow (kept out of make test for its time), step time and
#                  state memory of every optimizer, Eva/SGD over 1-8 devices, the
#                  tuning protocol (every optimizer tuned alike, several seeds, budget to
#                  quality) on the autoencoder, the character LM and the ResNet classifier,
#                  Eva's knobs on the first two, and the headline table of docs/results.md from them
#                  (benchmarks/results/)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DATA_PACKAGE := dataset-fashion-mnist
CORPUS_PACKAGE := fortunes
CORPUS_DIR := /usr/share/games/fortunes
APT := DEBIAN_FRONTEND=noninteractive apt-get

# Missing data is an error for the demo; for tests and benchmarks it is only a warning
# (they use their own tiny files or synthetic data).
REQUIRE_DATA ?= 1

# make bench's workloads. The character LM is a 1-layer, d_model 32 model on 32-character
# windows, 16,000 steps (32 epochs of 500): at that budget SGD's and AdamW's test losses have
# flattened (benchmarks/results/char_lm_budget/), and a step costs about 4 ms; its tuned
# protocol with every member takes about 4 h 30 min in one process (docs/results.md: how
# it splits into processes side by side); its knob study runs half that budget.
AUTOENCODER_BENCH := sgd,adamw,muon,eva,eva-kln,eva-f,eva-s,kfac,kfac-authors,shampoo,eva+adamw,eva-f+adamw
CHAR_LM_BENCH := $(AUTOENCODER_BENCH)
# The classifier's workload (ResNet-8 of width 8 on all 60k images, 6 epochs) is the one of
# benchmarks/convergence.py, with every member and 2 seeds: its tuning takes about 6 h of
# one core (run as two processes side by side, --tune-only --per-optimizer), each seed's
# final runs (15 rows, interleaved) 1 h 50 min of one core, beside another process; the
# budget runs of seed 0 (25, 50 and 75 %) 1 h 45 min more (two processes, 52 min each).
CLASSIFIER_BENCH := $(AUTOENCODER_BENCH)
CHAR_LM_FLAGS := --epochs 32 --steps-per-epoch 500 --seq-len 32 --d-model 32 --layers 1 \
	--heads 2 --eval-batches 50 --eval-every 500

.PHONY: all $(VENV) install data corpus demo test lint docs bench clean
.DEFAULT_GOAL := test

all: test

$(VENV): $(PY)

$(PY):
	@if ! $(PYTHON) -m venv $(VENV); then \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "python3 -m venv failed; installing the Debian package python3-venv"; \
	    $(APT) install -y -q python3-venv || { $(APT) update -q && $(APT) install -y -q python3-venv; }; \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "error: '$(PYTHON) -m venv' failed. Install the venv module (Debian/Ubuntu: apt-get install python3-venv)." >&2; \
	    exit 1; \
	  fi; \
	fi
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,examples,docs]'
	@touch $@

install: $(STAMP)

DATA_MISSING = { \
	  echo "" >&2; \
	  echo "Fashion-MNIST is not available. Install the Debian package $(DATA_PACKAGE)" >&2; \
	  echo "(as root: apt-get install $(DATA_PACKAGE)), or put the IDX files in a directory" >&2; \
	  echo "and set EVA_OPTAX_DATA=/that/directory." >&2; \
	  if [ "$(REQUIRE_DATA)" = 1 ]; then exit 1; fi; \
	  echo "warning: continuing without Fashion-MNIST" >&2; }

data: install
	@if $(PY) -m examples.harness.datasets --check --no-download 2>/dev/null; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Fashion-MNIST not found; installing the Debian package $(DATA_PACKAGE)"; \
	  $(APT) install -y -q $(DATA_PACKAGE) \
	    || { $(APT) update -q && $(APT) install -y -q $(DATA_PACKAGE); } \
	    || echo "warning: apt-get could not install $(DATA_PACKAGE)" >&2; \
	  $(PY) -m examples.harness.datasets --check || $(DATA_MISSING); \
	else \
	  echo "Fashion-MNIST not found locally; trying to download it into the cache"; \
	  $(PY) -m examples.harness.datasets --check || $(DATA_MISSING); \
	fi

# The language-model example reads the Debian package fortunes (English text, offline).
corpus:
	@if [ -d $(CORPUS_DIR) ] || [ -n "$$EVA_OPTAX_CORPUS" ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing the Debian package $(CORPUS_PACKAGE) (the language model's corpus)"; \
	  $(APT) install -y -q $(CORPUS_PACKAGE) \
	    || { $(APT) update -q && $(APT) install -y -q $(CORPUS_PACKAGE); } \
	    || echo "warning: apt-get could not install $(CORPUS_PACKAGE)" >&2; \
	else \
	  echo "warning: no text corpus: install the Debian package $(CORPUS_PACKAGE) or set EVA_OPTAX_CORPUS" >&2; \
	fi

demo: install data
	$(PY) -m examples.autoencoder

# Sphinx + MyST (the notebook is rendered as committed, not executed); tests/harness/test_docs.py
# builds the same into a temporary folder.
docs: install
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# Two workers (pytest-xdist), a test module each at a time: the suite's compiles are mostly
# single-threaded, so 2 cores run two modules side by side.
test: REQUIRE_DATA := 0
test: install data lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# ruff: the linter and the formatter (2-space indents, 100 columns) over the whole repository;
# `$(PY) -m ruff format .` rewrites what the check rejects.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: REQUIRE_DATA := 0
bench: install data corpus
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow
	$(PY) -m benchmarks.step_time
	$(PY) -m benchmarks.multi_device
	$(PY) -m benchmarks.sharded
	$(PY) -m benchmarks.protocol --workload autoencoder --optimizers $(AUTOENCODER_BENCH) --budget-seeds 0
	$(PY) -m benchmarks.protocol --workload char_lm --optimizers $(CHAR_LM_BENCH) --seeds 0,1 --budget-seeds 0 -- $(CHAR_LM_FLAGS)
	$(PY) -m benchmarks.protocol --workload classifier --optimizers $(CLASSIFIER_BENCH) --seeds 0,1 --budget-seeds 0
	$(PY) -m benchmarks.knobs --workload autoencoder --seeds 0,1
	$(PY) -m benchmarks.knobs --workload char_lm --seeds 0 -- $(CHAR_LM_FLAGS) --epochs 16
	$(PY) -m benchmarks.headline --readme docs/results.md

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis
