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
	# torch first, CPU build, so nothing pulls the CUDA wheels
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,novae,rctd,prod]"
	touch $(STAMP)

setup: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

# demo and ui start the bundled S3 (deployment local_s3) themselves and stop it on exit if they started
# it (Ctrl-C included); no Dagster resource ever starts a server. By hand: python -m spatial_assets.storage.local_s3 start|stop|status
demo: setup
	$(PY) -m spatial_assets.defs.demo

test: setup
	bash deploy/ensure_postgres.sh
	SPATIAL_ASSETS_DEPLOYMENT=local $(VENV)/bin/dagster definitions validate -w workspace.yaml
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900

validate: setup
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

ui: setup
	$(PY) -m spatial_assets.defs.demo --ui-only

bench: setup
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	-$(PY) -m spatial_assets.storage.local_s3 stop
	rm -rf .local
