# Two set-up commands (see README): `make demo` and `make test`. Both work from nothing:
# they create .venv, install torch (CPU build), the project with its extras, MLX and Nim.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nnbridge-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: all setup nim test lint demo bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@touch $(STAMP)

setup: $(STAMP) nim

nim:
	@bash .ci/ensure-nim

lint: $(STAMP)
	$(VENV)/bin/ruff check nnbridge converters tests examples benchmarks

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) examples/demo.py

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache demo_out
