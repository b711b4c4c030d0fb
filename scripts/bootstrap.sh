#!/usr/bin/env bash
# Install what `make test` needs on a fresh Debian machine: PostgreSQL 15, pgbouncer and python3-venv
# from apt when missing, then a virtualenv with the project and its test extras. Idempotent.
set -euo pipefail
venv=${1:-.venv}

python=${PYTHON:-python3}
need_apt=()
# Debian splits `venv` from python3: without python3-venv, `python3 -m venv` fails (no ensurepip).
[ -x "$venv/bin/python" ] || "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client-15)
command -v pgbench >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/pgbench ] || need_apt+=(postgresql-contrib)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing ${need_apt[*]}; run as root or install them with apt" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian packages start their own services where systemd runs; the tests start their own
# servers on free ports, so stop those to keep the machine quiet (harmless when not running).
service pgbouncer stop >/dev/null 2>&1 || true

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e '.[test]'
