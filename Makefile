# mlpipe: every target installs what it needs into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: bytecode demo test test-slow bench bench-nested bench-crossed bench-ar1 bench-moments bench-scale bench-glmm install clean browser lint fit

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## mlpipe's bytecode, (re)compiled where a source changed: an editable install compiles none,
## and with PYTHONDONTWRITEBYTECODE set every process would compile the sources again
## (~0.1 s of each CLI call). Cheap when nothing changed.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q mlpipe

HSB_MODELS := hsb_null hsb_ancova hsb_means hsb_int_anc hsb_rc hsb_full

## the main job: the HLM sequence of six two-level models on the shipped HSB data (DuckDB),
## their comparison table and an HTML report, then a three-level growth model, all under out/
demo: bytecode
	@for m in $(HSB_MODELS); do \
	  echo "=================== $$m"; \
	  $(BIN)/mlpipe fit --config configs/$$m.toml || exit $$?; \
	done
	@echo "=================== model comparison: adding level-1 and level-2 predictors (ML refits)"
	$(BIN)/mlpipe compare out/hsb_null out/hsb_means out/hsb_int_anc out/hsb_full --out out/comparison
	@echo "=================== model comparison: is the cses slope random? (REML, boundary test)"
	$(BIN)/mlpipe compare out/hsb_ancova out/hsb_rc --out out/comparison_slope
	$(BIN)/mlpipe report $(addprefix out/,$(HSB_MODELS)) --out out/report.html
	@echo "=================== three-level growth: pupils in schools over six grades (egsingle)"
	$(BIN)/mlpipe fit --config configs/egsingle_growth.toml
	@echo "=================== growth curves: quadratic, piecewise-linear, AR(1) residuals (egsingle)"
	$(BIN)/mlpipe fit --config configs/egsingle_quadratic.toml -q --out out/egsingle_quadratic
	$(BIN)/mlpipe fit --config configs/egsingle_piecewise.toml -q --out out/egsingle_piecewise
	$(BIN)/mlpipe fit --config configs/egsingle_ar1.toml
	$(BIN)/mlpipe compare out/egsingle_growth out/egsingle_ar1 --out out/comparison_ar1

## the tests (slow ones excluded; `make test-slow` runs those). The report test opens the HTML
## in headless Chromium: installed from Debian's packages when missing and we are root.
test: bytecode browser
	$(BIN)/python -m pytest -q

browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: the browser test will be skipped"

test-slow: bytecode
	$(BIN)/python -m pytest -q -m slow  # exit 5 (no test selected) fails the target

## the scale benchmark: simulate a 10M-row panel, fit it, compare with a bare DuckDB query
bench: bytecode
	$(BIN)/python benchmarks/bench.py

## several grouping factors: 20M rows of children nested in schools; InstEval (crossed) and
## a 10M-row crossed design (see benchmarks/bench_multilevel.py)
bench-nested: bytecode
	$(BIN)/python benchmarks/bench_multilevel.py nested

bench-crossed: bytecode
	$(BIN)/python benchmarks/bench_multilevel.py crossed

## serially correlated residuals, ar1(t | subject): a 10M-row panel (1M subjects x 10
## occasions; also 1M rows) against a bare DuckDB window pass, and 2 series of 100k / 1M points
bench-ar1: bytecode
	$(BIN)/python benchmarks/bench_ar1.py --rows 1000000 10000000

## the method of moments on a MovieLens-32M-shaped crossed design: 200k users x 84k items
## (Zipf item popularity), 32M rows (also 4M, for the curve) against bare DuckDB aggregates
bench-moments: bytecode
	$(BIN)/python benchmarks/bench_moments.py --rows 4000000 32000000

## GLMMs at scale: a 10M-row Bernoulli panel (100k groups), y ~ x + w + (x | g), fitted by
## iterated DuckDB passes; glmer on a 1M-row slice when R is installed (benchmarks/bench_glmm.py)
bench-glmm: bytecode
	$(BIN)/python benchmarks/bench_glmm.py

## the engines at scale: 1M / 10M / 100M rows (10k / 100k / 1M groups, up to 64 Parquet
## files) through DuckDB, Polars and Dask (2-worker LocalCluster) against a bare DuckDB
## aggregation (see benchmarks/bench_scale.py)
bench-scale: bytecode
	$(BIN)/python benchmarks/bench_scale.py

## Makefile-driven runs: `make fit CONFIG=configs/X.toml [RUNS=out/runs]` keeps
## RUNS/X/stats.parquet, RUNS/X/fit/result.json and RUNS/X/report.html as file targets, each
## rebuilt only when what it is made from changed: the config and the data files it names,
## then the statistics, then the result
CONFIG ?= configs/hsb_full.toml
RUNS   ?= out/runs
RUN    := $(RUNS)/$(basename $(notdir $(CONFIG)))
CONFIG_DATA = $(shell $(BIN)/python -c "import glob, os, tomllib; \
  d = tomllib.load(open('$(CONFIG)', 'rb')).get('data', ''); \
  print(' '.join(sorted(glob.glob(os.path.join(d, '*')) if os.path.isdir(d) else glob.glob(d))))" \
  2>/dev/null)

fit: $(RUN)/report.html

$(RUN)/stats.parquet: $(CONFIG) $(CONFIG_DATA) | $(STAMP)
	@mkdir -p $(@D)
	$(BIN)/mlpipe stats --config $(CONFIG) --out $@

$(RUN)/fit/result.json: $(RUN)/stats.parquet $(CONFIG)
	$(BIN)/mlpipe fit --config $(CONFIG) --stats $< --out $(RUN)/fit -q

$(RUN)/report.html: $(RUN)/fit/result.json
	$(BIN)/mlpipe report $(RUN)/fit --out $@

lint: $(STAMP)
	$(BIN)/ruff check mlpipe tests benchmarks

clean:
	rm -rf out bench_data bench_data_multilevel bench_data_ar1 bench_data_moments
