# crm-bridge — set-up and everyday commands. `make run` and `make test` work on a fresh
# machine: they install what is missing (PostgreSQL via apt-get, the virtualenv).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
DEVENV := deploy/devenv.sh

.PHONY: help run test lint migrate bench clean system venv

help:
	@echo "make run      run the daemon (throwaway local PostgreSQL unless CRM_BRIDGE_DATABASE_URL is set)"
	@echo "make test     run the whole test suite against a real PostgreSQL"
	@echo "make lint     ruff + mypy --strict on daemon/ and web/"
	@echo "make migrate  apply the migrations to CRM_BRIDGE_DATABASE_URL (or the local DB)"
	@echo "make bench    run the benchmarks and print a table"
	@echo "make clean    remove the virtualenv, caches and the local database"

system:
	@$(DEVENV) system

venv: system
	@$(DEVENV) venv

run: venv
	@set -e; url=$$($(DEVENV) database); \
	export CRM_BRIDGE_DATABASE_URL="$$url"; \
	if [ -z "$${CRM_BRIDGE_SECRET_KEY:-}" ]; then export CRM_BRIDGE_DEV_MODE=1; fi; \
	$(BIN)/crm-bridge migrate; \
	echo "crm-bridge: database $$url"; \
	echo "crm-bridge: serving on http://$${CRM_BRIDGE_HOST:-127.0.0.1}:$${CRM_BRIDGE_PORT:-8019}/health"; \
	exec $(BIN)/crm-bridge run

migrate: venv
	@set -e; url=$$($(DEVENV) database); CRM_BRIDGE_DATABASE_URL="$$url" $(BIN)/crm-bridge migrate

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check daemon web tests bench
	$(BIN)/mypy

bench: venv
	@$(DEVENV) bench
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	-@[ -d .pgdata ] && $(BIN)/python -m daemon.pgcluster destroy .pgdata || true
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
