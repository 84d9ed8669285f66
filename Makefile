# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv from a bare python3 and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
DEPS := pyproject.toml constraints.txt setup.py src/gradclip/_backends/_kernels.c
LINTED := $(wildcard src tests benchmarks examples)

.PHONY: demo test lint format docs examples bench clean

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

$(VENV)/.docs-installed: $(DEPS) | $(BIN)/python
	$(PIP) -e '.[docs]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m gradclip

test: $(VENV)/.test-installed
	$(BIN)/python -m ruff check $(LINTED)
	$(BIN)/python -m ruff format --check $(LINTED)
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest

# The documentation site, into site/ (strict: a warning is an error).
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# Every example, full length, into examples/out/; the plots shown in docs/ are copied.
examples: $(VENV)/.test-installed
	$(BIN)/python examples/tutorial_loop.py --out examples/out
	$(BIN)/python examples/numpy_loop.py --out examples/out
	$(BIN)/python examples/exploding_rnn_torch.py --out examples/out
	$(BIN)/python examples/exploding_rnn_jax.py --out examples/out
	cp examples/out/exploding_rnn_torch.png examples/out/exploding_rnn_jax.png docs/img/

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
