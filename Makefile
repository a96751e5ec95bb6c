# `make run` and `make test` do all the set-up on a fresh machine: .venv, torch first, then the project.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint repro bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement with no torch installed pulls the CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install  ## the qa-pipeline Prefect flow on params.yaml and the bundled SQuAD sample
	$(BIN)/spanflow run

test: install  ## ruff, then pytest (exit 5, "no tests ran", fails the target)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

repro: install  ## the same stages through DVC
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

bench: install  ## benchmarks/bench.py -> benchmarks/results.{md,json} + MLflow (needs make run's trained model)
	@test -f models/final/hf/model.safetensors || $(MAKE) run
	$(BIN)/python -m benchmarks.bench

clean:
	rm -rf data/prepared data/features models results mlflow.db mlruns/*
