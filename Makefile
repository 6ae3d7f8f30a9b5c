# The two commands: `make run` (broker + worker in the foreground) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup run test test-long lint bench profile chaos docs clean
.DEFAULT_GOAL := help

help:
	@echo "make run    - start a local Kafka broker (unless one answers) and a worker; Ctrl-C stops both"
	@echo "make test   - run the whole test suite against a real local broker"
	@echo "make test-long - the long fuzz and fault runs (make test skips them)"
	@echo "make lint   - ruff"
	@echo "make bench  - the benchmark (prints figures; BENCH_ARGS=... for options)"
	@echo "make profile - the steady 50/s load under py-spy: .local/profile/profile.svg (flame graph)"
	@echo "make chaos  - the fault suite (prints a table)"
	@echo "make docs   - regenerate docs/asyncapi.yaml from the models (a test fails when stale)"
	@echo "make clean  - delete .local/ (broker data, logs, jars, worker keys)"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed
	$(BIN)/python -m phoneverify.ops.broker fetch

run: setup
	$(BIN)/python -m phoneverify.ops.broker run -- $(BIN)/phoneverify worker

test: setup
	$(BIN)/pytest

# The long forms of the fuzz runs (FUZZ_LONG_EXAMPLES), the zombie worker and the 3-node
# cluster runs (a leader killed under load, a node killed): about 6 minutes.
test-long: setup
	$(BIN)/pytest -m long

lint: $(BIN)/.installed
	$(BIN)/ruff check .

BENCH_ARGS ?=
bench: setup
	$(BIN)/python -m phoneverify.ops.broker run -- $(BIN)/python bench/bench.py $(BENCH_ARGS)

# The steady 50/s load only (PROFILE_ARGS to change it), the worker sampled by py-spy: a flame
# graph in .local/profile/profile.svg, collapsed stacks beside it, a summary by layer on stdout.
PROFILE_ARGS ?= --rate 50 --latency-seconds 60 --crc32-rate 0
profile: setup
	$(BIN)/python -m phoneverify.ops.broker run -- $(BIN)/python bench/bench.py \
		--py-spy .local/profile $(PROFILE_ARGS)

# Starts its own brokers (ports 59092-59102 by default, ARGS=--port to move them) in /tmp.
chaos: setup
	$(BIN)/python bench/chaos.py $(ARGS)

docs: $(BIN)/.installed
	$(BIN)/phoneverify schema asyncapi --output docs/asyncapi.yaml

clean:
	rm -rf .local
