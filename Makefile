# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up
# on the way (virtual environment, dependencies, the embedded PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-full project install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The benchmarks also need the `bench` extra (progress bar, plots): their own stamp.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(BENCH_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m gateway

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --quick
	$(BIN)/python -m perf.naive --quick
	$(BIN)/python -m perf.growth --portfolios 1000
	$(BIN)/python -m perf.analytics

bench-full: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench
	$(BIN)/python -m perf.naive
	$(BIN)/python -m perf.growth
	$(BIN)/python -m perf.analytics

project: $(STAMP)
	$(BIN)/python -m actors.projection_cli

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
