# The two commands of the README are `make demo` and `make test`; everything else is a step of them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null || echo /opt/wheels)
STACK := $(PY) -m scripts.localstack
PYTEST_ARGS ?=
CHAOS_ARGS ?=
BENCH_SWEEP_ARGS ?=
# Airflow's executor for `make up` (and every target that runs it): local (LocalExecutor) or celery
# (CeleryExecutor: Redis broker, two workers, two triggerers). The stack remembers it for down/status.
EXECUTOR ?= local

.PHONY: help deps venv up down status wheelhouse demo test test-long test-unit lint bench bench-sweep chaos load clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

deps: venv  ## install Debian packages, podman-hpc and the Python environment
	@scripts/install_system.sh
	@scripts/install_podman_hpc.sh

# The venv is rebuilt when a requirements file changes; uv + find-links takes the local CPU torch wheel.
# --compile-bytecode: uv leaves no .pyc behind, and where PYTHONDONTWRITEBYTECODE is set (CI, some
# shells) every Airflow task process then compiled Airflow and MLflow from source (2-3x its start-up).
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt training/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(UV) || $(VENV)/bin/pip install -q "uv==0.13.9"
	$(UV) pip install -q --compile-bytecode --python $(PY) --find-links $(FIND_LINKS) -r requirements.txt -r requirements-dev.txt
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $@

up: deps  ## start the local HPC site + Airflow (idempotent; EXECUTOR=celery: the CeleryExecutor)
	@$(STACK) up --executor $(EXECUTOR)

down:  ## stop every service of the local stack
	@if [ -x $(PY) ]; then $(STACK) down; else echo "no .venv: nothing to stop"; fi

status:  ## one table: each service's state and health
	@$(STACK) status

wheelhouse: venv  ## wheels for the training image (make up does this too)
	@scripts/wheelhouse.sh

demo: up  ## all set-up, start the stack, run the main job end to end
	@$(PY) -m scripts.demo

# The long fault tests (minutes each) are left to test-long: CI stays under 40 minutes, and the
# same promises are kept there by the chaos smoke (tests/e2e/test_chaos_smoke.py).
test: up  ## all set-up and the whole suite against the real local stack (but the long tests)
	$(PY) -m pytest -m "not long" $(PYTEST_ARGS)

test-long: up  ## the long fault tests (a scheduler, triggerer and api-server killed in one run)
	$(PY) -m pytest -m long $(PYTEST_ARGS)

test-unit: venv  ## fast tests only (no services)
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# sweep_scale.py (a 1,000-trial sweep, about an hour here) has its own target.
bench: up  ## benchmarks: print figures, write bench/results/*.json (but the long sweep)
	@for b in bench/*.py; do [ "$$b" = bench/sweep_scale.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-sweep: up  ## a 1,000-trial hparam_sweep end to end (BENCH_SWEEP_ARGS="--trials 200")
	$(PY) bench/sweep_scale.py $(BENCH_SWEEP_ARGS)

# Not part of `make test` (CI stays under 40 min): a full run is 120 trials of a minute or more.
chaos: up  ## fault injection on real runs, docs/RELIABILITY.md (CHAOS_ARGS=--smoke: one trial each)
	$(PY) -m scripts.chaos $(CHAOS_ARGS)

load: up  ## 50 train_model runs at once + a 5-date hparam_sweep backfill (LOAD_ARGS=--smoke: 4 + 1)
	$(PY) -m scripts.chaos.load $(LOAD_ARGS)

clean: down  ## remove the stack's state (data, keys, images) and the venv
	rm -rf .stack $(VENV)
