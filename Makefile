# mlpipe: every target installs what it needs into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## the main job: fit the demo models on the shipped HSB data with the embedded DuckDB engine
demo: $(STAMP)
	$(BIN)/mlpipe fit --config configs/hsb_full.toml

## the tests (slow ones excluded; `make test-slow` runs those)
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## the scale benchmark: simulate a 10M-row panel, fit it, compare with a bare DuckDB query
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf out bench_data
