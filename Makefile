# crm-bridge — set-up and everyday commands. `make run` and `make test` work on a fresh
# machine: they install what is missing (PostgreSQL via apt-get, the virtualenv).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
DEVENV := deploy/devenv.sh

.PHONY: help run demo stop test chaos lint docs migrate bench clean system venv

help:
	@echo "make run      run the daemon (throwaway local PostgreSQL unless CRM_BRIDGE_DATABASE_URL is set)"
	@echo "make demo     crm-bridge with simulated RetailCRM and PBX, two enterprises, calls (Ctrl-C stops)"
	@echo "make stop     stop the throwaway local PostgreSQL that make run started"
	@echo "make test     run the whole test suite against a real PostgreSQL (with a short chaos run)"
	@echo "make chaos    the full chaos suite: 9,000 events, kills, PostgreSQL restarts, CRM faults"
	@echo "make lint     ruff + mypy --strict on daemon/ and web/"
	@echo "make docs     rewrite the generated tables of docs/ (configuration reference, metrics)"
	@echo "make migrate  apply the migrations to CRM_BRIDGE_DATABASE_URL (or the local DB)"
	@echo "make bench    run the benchmarks and print a table"
	@echo "make clean    stop and delete the local database (and dev mode's secrets), the virtualenv, caches, demo logs"

system:
	@$(DEVENV) system

venv: system
	@$(DEVENV) venv

run: venv
	@set -e; local_db=$$([ -n "$${CRM_BRIDGE_DATABASE_URL:-}" ] || echo yes); \
	url=$$($(DEVENV) database); \
	export CRM_BRIDGE_DATABASE_URL="$$url"; \
	if [ -z "$${CRM_BRIDGE_SECRET_KEY:-}" ]; then export CRM_BRIDGE_DEV_MODE=1; fi; \
	$(BIN)/crm-bridge migrate; \
	echo "crm-bridge: database $$url"; \
	if [ "$$local_db" = yes ]; then \
	    echo "crm-bridge: this throwaway PostgreSQL (.pgdata) keeps running after crm-bridge"\
	         "stops: make stop stops it, make clean deletes it"; \
	fi; \
	exec $(BIN)/crm-bridge run

# The demo (daemon/demo): simulators, two demo enterprises, crm-bridge, a stream of calls.
# DEMO_ARGS passes options, e.g. make demo DEMO_ARGS='--port 8029 --calls-per-minute 60'.
demo: venv
	@set -e; local_db=$$([ -n "$${CRM_BRIDGE_DATABASE_URL:-}" ] || echo yes); \
	url=$$($(DEVENV) database); \
	export CRM_BRIDGE_DATABASE_URL="$$url"; \
	echo "crm-bridge demo: database $$url; starting the simulators and crm-bridge..."; \
	exec $(BIN)/python -m daemon.demo $${local_db:+--throwaway-db} $(DEMO_ARGS)

stop:
	@if [ -d .pgdata ]; then $(PYTHON) -m daemon.pgcluster stop .pgdata && \
	    echo "stopped the throwaway PostgreSQL in .pgdata (make run starts it again)"; fi

migrate: venv
	@set -e; url=$$($(DEVENV) database); CRM_BRIDGE_DATABASE_URL="$$url" $(BIN)/crm-bridge migrate

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

chaos: venv
	CHAOS_PROFILE=full $(BIN)/python -m pytest -m chaos -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check daemon web tests bench
	$(BIN)/mypy

docs: venv
	$(BIN)/python -m daemon.reference

bench: venv
	@$(DEVENV) bench
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	-@[ -d .pgdata ] && $(PYTHON) -m daemon.pgcluster destroy .pgdata || true
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist .bench .demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
