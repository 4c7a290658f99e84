# Two commands for a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export SPATIAL_ASSETS_HOME ?= $(CURDIR)/.local
export DAGSTER_HOME ?= $(CURDIR)/.local/dagster_home
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test ui validate bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch first, CPU build, so nothing pulls the CUDA wheels
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml 2>/dev/null || true

demo: setup
	$(PY) -m spatial_assets.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

validate: setup
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

ui: setup
	$(PY) -m spatial_assets.demo --ui-only

bench: setup
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf .local
