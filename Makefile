# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv from a bare python3 and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
DEPS := pyproject.toml constraints.txt
LINTED := $(wildcard src tests benchmarks examples)

.PHONY: demo test lint format docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

# One stamp per extras set, redone when the dependencies change.
$(VENV)/.demo-installed: $(DEPS) | $(BIN)/python
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.test-installed: $(DEPS) | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m gradclip

test: $(VENV)/.test-installed
	$(BIN)/python -m ruff check $(LINTED)
	$(BIN)/python -m ruff format --check $(LINTED)
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/python -m ruff check $(LINTED)

format: $(VENV)/.test-installed
	$(BIN)/python -m ruff format $(LINTED)
	$(BIN)/python -m ruff check --fix $(LINTED)

$(VENV)/.bench-installed: $(DEPS) | $(BIN)/python
	$(PIP) -e '.[bench]'
	touch $@

# The full benchmark (minutes; tables on stdout, JSON + PNG in benchmarks/results/).
# BENCH_ARGS=--docs also refreshes docs/bench.json and docs/img/bench.png.
bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site
