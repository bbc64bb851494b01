# Two commands get a newcomer going: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# glibc hands every block over 32 MB back to the kernel and re-faults it on the next forward
# pass; keeping freed memory in the process makes CPU inference and training ~2x faster.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_ARENA_MAX ?= 1
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist); TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

.PHONY: setup system-deps demo stop test test-fast test-compose lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	@touch $@

# Sample faces -> train + promote a small model -> API + worker in the background -> a batch
# job through the REST API -> predictions. Re-runnable; `make stop` ends the services.
demo: setup
	$(PY) -m scripts.demo

stop:
	@test -x $(PY) && $(PY) -m scripts.stop || true

# What pip can't install: Debian's Chromium for the console's browser tests (as root, once).
system-deps:
	@bash scripts/system_deps.sh

test: setup system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist load $(PYTEST_ARGS)

# The real compose stack (root, or a running Docker engine): builds the images, starts
# docker-compose.yml with the CPU override, trains, scales, kills a worker, adds a worker host.
test-compose: setup
	PY=$(PY) bash scripts/compose_stack/run.sh $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

# Style (ruff), types (mypy) and the architecture's import contracts (import-linter), all in
# pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf var outputs .pytest_cache .ruff_cache
