# rebuildd — the two commands a newcomer needs are `make run` and `make test` (see README.md).
# Every target installs what it needs; nothing here assumes a hand-prepared machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export REBUILDD_STATE_DIR ?= $(CURDIR)/.state
HOST ?= 127.0.0.1
PORT ?= 8774
PYTEST_ARGS ?=

.PHONY: run test bench lint format venv system-run system-test libvirtd postgres openstack-venvs guest-image clean

## run: install what is missing, migrate, seed the demo data, serve on $(HOST):$(PORT)
run: system-run $(VENV)/.run-installed
	$(BIN)/rebuildd db upgrade
	$(BIN)/rebuildd seed-demo
	exec $(BIN)/rebuildd serve --host $(HOST) --port $(PORT)

## test: install what is missing (libvirtd + QEMU, PostgreSQL if absent, the OpenStack
## services' venvs, the tiny test guest), lint, run every test
test: system-test $(VENV)/.installed libvirtd postgres openstack-venvs guest-image lint
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: the benchmark against a live daemon (test driver, then real QEMU for --qemu);
## BENCH_ARGS='--postgres', see --help. The daemon runs from $(RUN_VENV), which holds rebuildd's
## runtime dependencies only, as a host's install does (the dev venv's test tools change what
## its imports load: structlog takes in rich when it is there).
BENCH_ARGS ?=
RUN_VENV ?= .venv-run
bench: system-test $(VENV)/.installed $(RUN_VENV)/.installed libvirtd postgres
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install --quiet matplotlib
	BENCH_REBUILDD=$(RUN_VENV)/bin/rebuildd $(BIN)/python -m bench $(BENCH_ARGS)

$(RUN_VENV)/.installed: pyproject.toml
	test -x $(RUN_VENV)/bin/python || $(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RUN_VENV)/bin/python -m pip install --quiet -e .
	touch $@

## lint: ruff (lint + format check) and mypy --strict
lint: $(VENV)/.installed
	$(BIN)/ruff check rebuildd tests alembic bench
	$(BIN)/ruff format --check rebuildd tests alembic bench
	$(BIN)/mypy
	$(BIN)/mypy bench

format: $(VENV)/.installed
	$(BIN)/ruff format rebuildd tests alembic
	$(BIN)/ruff check --fix rebuildd tests alembic

venv: $(VENV)/.installed

# make run needs rebuildd's runtime dependencies only; the dev venv (make test) is a superset.
$(VENV)/.run-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

system-run:
	scripts/ensure-packages.sh run

system-test:
	scripts/ensure-packages.sh test

libvirtd:
	scripts/libvirtd.sh start

postgres:
	scripts/ensure-postgres.sh

## openstack-venvs: real Keystone, Glance and Cinder (pinned), each in a cached venv outside the repo
openstack-venvs:
	PYTHON=$(PYTHON) scripts/openstack-venvs.sh

## guest-image: the tiny real guest of tests/test_real_guest.py, from Debian packages (cached
## outside the repo, keyed by the package versions: $XDG_CACHE_HOME or ~/.cache, rebuildd/tinyguest)
guest-image: system-test
	scripts/tinyguest.sh

clean:
	rm -rf $(VENV) $(RUN_VENV) .state .mypy_cache .ruff_cache .pytest_cache
