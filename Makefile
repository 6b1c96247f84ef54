# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up
# on the way (virtual environment, dependencies, the embedded PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test chaos bench bench-full project install clean screenshots

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
	$(BIN)/alluse serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fault suite at full length (issue 14): the real service under load while its
# PostgreSQL is killed, stopped, its disk filled (a tmpfs: needs root, skipped otherwise),
# and a second engine and a standby start; a bank check after each. `make test` runs a
# shorter version. The measured recovery times are printed and kept in chaos-report.jsonl.
chaos: $(STAMP)
	rm -f chaos-report.jsonl
	ALLUSE_CHAOS=full ALLUSE_CHAOS_REPORT=$(CURDIR)/chaos-report.jsonl $(BIN)/python -m pytest -q -s \
		-p no:randomly tests/test_chaos.py tests/test_fencing.py

# perf.bench (issue 4): every workload in-process and over HTTP at 1..1000 users, the
# naive and bare-ceiling baselines, the ALL-USE week, restarts, each figure the median of
# three passes; bench-full adds every level of every workload and the million-account
# figures. Its table comes last; a missed analytics target is reported without stopping
# the run.
bench: $(BENCH_STAMP)
	-$(BIN)/python -m perf.analytics
	-$(BIN)/python -m perf.webhooks --quick
	$(BIN)/python -m perf.bench --quick

bench-full: $(BENCH_STAMP)
	-$(BIN)/python -m perf.analytics
	$(BIN)/python -m perf.bench

# The console's pictures in docs/console (shown in the README): the browser tests, saving
# their screenshots there instead of in a temporary directory. Needs Debian's chromium.
screenshots: $(STAMP)
	ALLUSE_CONSOLE_SCREENSHOTS=docs/console $(BIN)/python -m pytest -q tests/test_console.py

project: $(STAMP)
	$(BIN)/alluse project

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
