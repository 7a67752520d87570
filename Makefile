# Quick start: `make demo` runs the demo, `make test` runs the tests (each creates .venv).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean-cache

$(BIN)/gradalign: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, from the exact pin: anything else would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/gradalign

demo: $(BIN)/gradalign
	$(BIN)/gradalign demo

test: $(BIN)/gradalign
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(BIN)/gradalign
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(BIN)/gradalign
	$(BIN)/python benchmarks/scoring.py
