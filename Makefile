# marketplacedb-operator: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test lint demo bench bench-quick bench-fleet e2e soak generate image image-push clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

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

bench: $(VENV)/.bench-installed  ## full benchmark, writes bench/REPORT.md (8.1 min measured on 2 quiet cores, limit 10)
	$(PY) -m bench.run --full

bench-quick: $(VENV)/.bench-installed  ## quick benchmark, writes bench/REPORT.md (measured 3.5 and 4.2 min while other work used 70-95% of the CPUs)
	$(PY) -m bench.run --quick

bench-fleet: $(VENV)/.bench-installed  ## the operator at N=1,000 alone, writes bench/REPORT-fleet.md (29 min measured on a loaded machine)
	$(PY) -m bench.run --fleet

# No $(STAMP) prerequisite: the script first checks for a container engine (and says NOT RUN
# without one), and needs only python3, not the virtualenv or the apt packages.
e2e:  ## kind cluster end-to-end (needs Docker, kind, kubectl; says NOT RUN and exits 0 without them)
	bash scripts/e2e.sh

# The one image: operator, refresh CronJobs and the pooler's agent sidecar. IMAGE is the repository
# the chart's image.repository points at; TAG its image.tag (default: the package version).
IMAGE ?= marketplacedb-operator
TAG ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' operator/marketplacedb_operator/__init__.py)
CONTAINER_ENGINE ?= docker

image:  ## build the image IMAGE:TAG (default marketplacedb-operator:<version>) with docker (or CONTAINER_ENGINE=podman)
	@command -v $(CONTAINER_ENGINE) >/dev/null || { echo "make image: no $(CONTAINER_ENGINE) command (set CONTAINER_ENGINE=podman?)"; exit 1; }
	$(CONTAINER_ENGINE) build --build-arg VERSION=$(TAG) --build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) -t $(IMAGE):$(TAG) .

image-push: image  ## build, then push IMAGE:TAG to its registry (log in first)
	$(CONTAINER_ENGINE) push $(IMAGE):$(TAG)

soak: $(STAMP)  ## the longer reliability soak
	SOAK=1 $(BIN)/pytest -q tests/reliability

clean:  ## remove the virtualenv and tool caches
	rm -rf $(VENV) .mypy_cache .ruff_cache
