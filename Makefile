# The README's two commands: `make bench` and `make test`. Each creates .venv if missing and installs into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seqfast-installed
PLUGIN_PROJECTS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install test lint bench info clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a bare `torch` requirement on an empty venv would pull a multi-GB CUDA build
$(STAMP): $(BIN)/python pyproject.toml $(PLUGIN_PROJECTS)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	$(foreach p,$(PLUGIN_PROJECTS),$(BIN)/python -m pip install -e $(dir $(p)) &&) true
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/seqfast bench

info: $(STAMP)
	$(BIN)/seqfast info

clean:
	rm -rf $(VENV) .asv build *.egg-info

# make asv, make asv-preview, make asv-ci
include benchmarks/Makefile.asv.mk
