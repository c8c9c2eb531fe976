# One entry point per job. Each target creates .venv and installs the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-step clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the main job on an embedded default: photo-crop shards, pretraining on local Ray, kNN vs random init
demo: $(STAMP)
	$(BIN)/moco demo

## test: lint, type-check moco_core, then run the whole test suite
test: lint
	$(BIN)/python -m pytest

## lint: ruff (lint + format check) and mypy on moco_core
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## bench-step: the training-step benchmark (JSON on the last line)
bench-step: $(STAMP)
	$(BIN)/moco bench step --json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
