# Every target runs from .venv, which bootstraps itself: on a fresh clone with only
# Python 3.11+, `make demo` and `make test` create it first.
#   make demo ARGS="--edges 3 --rate 100"    the whole system locally (Ctrl-C stops it)
#   make test PYTEST_ARGS="-k dev"           ruff, mypy and pytest, as CI runs them

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: the venv is rebuilt only when pyproject.toml is newer.
STAMP := $(VENV)/.installed
LINT_PATHS := common edge ingest tests

.DEFAULT_GOAL := help
.PHONY: help venv demo test lint bench clean distclean

help:
	@echo "make demo      run fanout dev: Valkey, ingest, 2 edges; ARGS='--edges 3' to change"
	@echo "make test      ruff + mypy + pytest (what CI runs)"
	@echo "make lint      ruff + mypy"
	@echo "make bench     run every bench/*.py"
	@echo "make venv      create/refresh .venv (done by the targets above when needed)"
	@echo "make clean     remove caches and build output; distclean also removes .venv"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "fanout needs Python 3.11+; $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
		     "Try: make PYTHON=python3.12 ..." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: venv
	$(BIN)/fanout dev $(ARGS)

test: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy
	@# The browser client's unit tests (node's own test runner, no npm packages).
	@if command -v node >/dev/null 2>&1; then node --test edge/static/test/; \
	elif [ -n "$$CI" ]; then echo "node is missing: the browser client's tests need it" >&2; exit 1; \
	else echo "node not found: skipping the browser client's unit tests"; fi
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

bench: venv
	@set -e; for script in bench/*.py; do \
		[ -e "$$script" ] || continue; \
		echo "== $$script"; \
		$(BIN)/python "$$script"; \
	done

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
