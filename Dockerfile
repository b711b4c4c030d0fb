# syntax=docker/dockerfile:1
# marketplacedb-operator image: `marketplacedb run` on a distroless Python 3.11, as user 65532.
#
# Not built by the test suite: the machines that run `make test` have no container engine.
# `make test` lints this file with hadolint; `make e2e` builds and runs it where Docker exists.
#
# Stage 1 installs the project from its own metadata (pyproject.toml) into /app/site-packages with
# pip on the official slim Python 3.11 image. Stage 2 is Google's distroless Python 3.11 on
# Debian 12: the same CPython minor version (binary wheels for cp311 load unchanged), no shell,
# no package manager, non-root by default. Pin both by digest in your registry mirror for
# reproducible builds (Renovate/Dependabot keep digests current).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Metadata and sources only (.dockerignore keeps tests, benchmarks and virtualenvs out).
COPY pyproject.toml README.md LICENSE* ./
COPY operator/ operator/
# --target: a plain directory the runtime stage's interpreter reads through PYTHONPATH (a venv
# would point at this stage's /usr/local/bin/python). Non-editable, dependencies from pyproject.
RUN pip install --no-cache-dir --target /app/site-packages . \
    && python -m compileall -q /app/site-packages
# A launcher for the distroless interpreter (/usr/bin/python3.11), so `marketplacedb ...` works as
# the entrypoint and in the refresh CronJobs without a shell.
RUN mkdir -p /app/bin \
    && printf '%s\n' '#!/usr/bin/python3.11' \
       'import sys' \
       'from marketplacedb_operator.cli import main' \
       'sys.exit(main())' > /app/bin/marketplacedb \
    && chmod 0755 /app/bin/marketplacedb

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="marketplacedb-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps a marketplace's PostgreSQL fast: concurrent indexes, materialized views with safe refreshes, a sized PgBouncer pooler and health probes." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/marketplacedb/marketplacedb-operator" \
      org.opencontainers.image.base.name="gcr.io/distroless/python3-debian12:nonroot"
COPY --from=build --chown=0:0 /app /app
ENV PYTHONPATH=/app/site-packages \
    PATH=/app/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 65532:65532
EXPOSE 8080 9090
# No HEALTHCHECK: Kubernetes probes the operator's /healthz (see the chart's Deployment).
ENTRYPOINT ["marketplacedb"]
CMD ["run"]
