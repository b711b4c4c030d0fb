# marketplacedb-operator: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test lint demo bench bench-quick e2e soak generate clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)  ## apt packages when missing (postgresql-15, pgbouncer) and a virtualenv with the project

lint: $(STAMP)  ## ruff, mypy (strict on the package), import-linter contracts
	$(BIN)/ruff check operator tests bench
	$(BIN)/mypy operator/marketplacedb_operator
	$(BIN)/lint-imports

test: lint  ## everything CI runs: lint, then every test tier (PostgreSQL, pgbouncer, KMock, manifests)
	$(BIN)/pytest -q -p no:cacheprovider

generate: $(STAMP)  ## regenerate every generated file: CRD (crds/, chart), chart RBAC rules, deploy/install.yaml
	$(BIN)/marketplacedb crd > crds/marketplacedbs.marketplacedb.io.yaml
	cp crds/marketplacedbs.marketplacedb.io.yaml charts/marketplacedb-operator/crds/
	$(BIN)/marketplacedb install-manifests --chart-rbac-rules > charts/marketplacedb-operator/templates/_rbac_rules.tpl
	$(BIN)/marketplacedb install-manifests > deploy/install.yaml
	$(PY) -m marketplacedb_operator.specs.reference README.md

demo: $(STAMP)  ## run the operator on a local sandbox (PostgreSQL + pgbouncer + KMock API); CLUSTER=1 for a real cluster
	$(BIN)/marketplacedb demo $(if $(CLUSTER),--cluster,)

# The benchmarks also need the `bench` extra (matplotlib, for the plots).
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed  ## full benchmark (~10 min), writes bench/REPORT.md
	$(PY) -m bench.run --full

bench-quick: $(VENV)/.bench-installed  ## quick benchmark (~2 min), writes bench/REPORT.md
	$(PY) -m bench.run --quick

e2e: $(STAMP)  ## kind cluster end-to-end (needs Docker and kind; says so and exits 0 without them)
	bash scripts/e2e.sh

soak: $(STAMP)  ## the longer reliability soak
	SOAK=1 $(BIN)/pytest -q tests/reliability

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
