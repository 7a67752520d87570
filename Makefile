# Quick start: `make demo` runs the demo, `make test` runs the checks and the tests, `make docs`
# serves the documentation site (each creates .venv).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint docs bench

$(BIN)/gradalign: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, from the exact pin: anything else would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/gradalign

demo: $(BIN)/gradalign
	$(BIN)/gradalign demo

# lint, the import contracts (pyproject.toml: importlinter), types, the docs site (broken
# links and references fail), then the tests, end-to-end runs included
test: lint
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q

lint: $(BIN)/gradalign
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

docs: $(BIN)/gradalign
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(BIN)/gradalign
	$(BIN)/python benchmarks/scoring.py
