"""The bench's own servers: a PostgreSQL 15 with the reference workload, the example resource
applied by `marketplacedb apply`, and pgbouncer on the config the operator renders.

Everything listens on 127.0.0.1 only; every server is stopped and removed at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from marketplacedb_operator import workload
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import server as server_facts
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.specs import pgbouncer as pgb
from marketplacedb_operator.specs.pooler_sizing import compute_budget

from . import load, pgbench
from ._harness import ROOT, PgBouncerProcess, PostgresServer

EXAMPLE = ROOT / "examples" / "marketplacedb.yaml"
DB, OWNER = "marketplace", "marketplace_owner"

# What differs from PostgreSQL's defaults (besides shared_buffers 512MB), and why. The data
# (~0.8 GB at 2 M products) fits in memory, as a marketplace's hot set does in production. fsync
# stays off as in the test harness (this VM's shared disk would otherwise dominate every write
# figure); full_page_writes is back on so that WAL volumes are what a production server writes.
SERVER_CONF = {
    "max_wal_size": "'4GB'",
    "maintenance_work_mem": "'256MB'",
    "full_page_writes": "on",
    "log_min_duration_statement": "-1",
}


def example_body() -> dict[str, Any]:
    """examples/marketplacedb.yaml, or (while it is being written) the same resource from workload.py."""
    if EXAMPLE.exists():
        body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        return body
    views = [{"name": name, "query": query, "uniqueKey": list(workload.VIEW_UNIQUE_KEYS[name]),
              "refresh": {"schedule": "*/5 * * * *", "skipIfUnchanged": True, "maxStaleness": "1h"}}
             for name, query in workload.VIEW_QUERIES.items()]
    return {"apiVersion": "marketplacedb.io/v1alpha1", "kind": "MarketplaceDB",
            "metadata": {"name": "shop", "namespace": "prod"},
            "spec": {"database": {"host": "x", "dbname": "x", "credentialsSecretRef": {"name": "shop-db-owner"}},
                     "materializedViews": views, "pooler": {"enabled": True}}}


def example_facts(body: dict[str, Any]) -> dict[str, Any]:
    """What the example declares, counted (the report describes the resource from these)."""
    spec = body["spec"]
    indexes = spec.get("indexes", [])
    return {
        "indexes": len(indexes),
        "non_btree": sum(1 for i in indexes if i.get("method", "btree") != "btree"),
        "views": len(spec.get("materializedViews", [])),
        "settings": len(spec["database"].get("settings", {})),
        "extensions": list(spec["database"].get("extensions", [])),
        "probes": len(spec.get("healthProbes", [])),
        "pooler_replicas": spec.get("pooler", {}).get("replicas"),
    }


def pointed_at(body: dict[str, Any], host: str, port: int, dbname: str) -> dict[str, Any]:
    """The example resource, pointed at a bench database (loopback: no TLS)."""
    body = copy.deepcopy(body)
    body["spec"]["database"].update(host=host, port=port, dbname=dbname, sslMode="disable")
    return body


@dataclasses.dataclass
class Workbench:
    """One PostgreSQL with the workload, the example applied, and its pooler."""

    pg: PostgresServer
    products: int
    password: str = dataclasses.field(repr=False)
    workdir: Path
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    bouncer: PgBouncerProcess | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    apply_output: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- connections ----------------------------------------------------------------------------

    def direct(self) -> pgbench.Target:
        return pgbench.Target(self.pg.host, self.pg.port, DB, OWNER, self.password)

    def pooled(self) -> pgbench.Target:
        if self.bouncer is None:
            raise RuntimeError("the pooler is not running")
        return pgbench.Target(self.bouncer.host, self.bouncer.port, DB, OWNER, self.password, "pooled")

    def dsn(self) -> str:
        return str(self.pg.dsn(DB, OWNER, self.password))

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(), autocommit=True)

    def superuser(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self.pg.connect(DB)
        return conn

    @property
    def spec(self) -> MarketplaceDBSpec:
        return MarketplaceDBSpec.model_validate(self.body["spec"])

    # -- lifecycle --------------------------------------------------------------------------------

    def load(self) -> None:
        """Schema and data as the owner (so the owner owns the tables, as in production), then
        VACUUM (ANALYZE) as autovacuum would have done on a live database."""
        started = time.perf_counter()
        with self.connect() as conn:
            conn.execute(workload.schema_sql())  # one session: data_sql uses temporary functions
            conn.execute(workload.data_sql(self.products))
        self.timings["load_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        with self.connect() as conn:
            conn.execute("VACUUM (ANALYZE)")
        self.timings["vacuum_seconds"] = time.perf_counter() - started

    def apply_example(self) -> dict[str, Any]:
        """`marketplacedb apply -f <example pointed here>`: the project's own command, in a subprocess.

        The DSN goes through MARKETPLACEDB_DSN, never the command line."""
        manifest = self.workdir / "marketplacedb.yaml"
        manifest.write_text(yaml.safe_dump(self.body, sort_keys=False))
        env = dict(os.environ, MARKETPLACEDB_DSN=self.dsn())
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "marketplacedb_operator.cli", "apply", "-f", str(manifest),
                               "-o", "json"], capture_output=True, text=True, env=env, timeout=1800)
        self.timings["apply_seconds"] = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"marketplacedb apply failed ({proc.returncode}): {proc.stderr[-2000:]}")
        self.apply_output = json.loads(proc.stdout)
        return self.apply_output

    def start_pooler(self) -> PgBouncerProcess:
        """pgbouncer on the config the operator renders for the example, sized from the server's
        real max_connections, authenticating with the server's own SCRAM verifier."""
        if self.bouncer is not None:
            self.bouncer.cleanup()
        spec = self.spec
        with self.superuser() as conn:
            limits = server_facts.read_server_limits(conn)
            verifier = server_facts.read_scram_verifier(conn, OWNER)
        budget = compute_budget(spec.pooler, Settings(), limits.max_connections, limits.superuser_reserved_connections)
        credentials = pgb.choose_credentials(OWNER, self.password, verifier)
        self.bouncer = PgBouncerProcess(pgb.render_ini(spec, budget), pgb.render_userlist(credentials))
        self.bouncer.start()
        self.timings[f"pool_size_at_{limits.max_connections}"] = budget.pool_size
        return self.bouncer

    def set_max_connections(self, value: int) -> None:
        """Restart PostgreSQL with another max_connections, and the pooler re-rendered for it."""
        if self.bouncer is not None:
            self.bouncer.cleanup()
            self.bouncer = None
        self.pg.max_connections = value
        self.pg.restart()
        self.pg.wait_ready()
        self.start_pooler()

    def close(self) -> None:
        if self.bouncer is not None:
            self.bouncer.cleanup()
        self.pg.cleanup()


def start(products: int, workdir: Path, *, max_connections: int = 600) -> Workbench:
    """A server on loopback with the workload loaded (not yet applied)."""
    pg = PostgresServer(max_connections=max_connections, shared_buffers="512MB", extra_conf=SERVER_CONF)
    pg.start()
    load.register_server(pg.datadir)  # its CPU is the bench's own, not outside load
    password = secrets.token_urlsafe(18)
    bench = Workbench(pg=pg, products=products, password=password, workdir=workdir)
    try:
        pg.create_role(OWNER, password)
        # As docs/install.md recommends: skip-if-unchanged sees other roles' sessions (the bench's
        # superuser ones) and skips when none may hold unreported writes (sql/refresh_stats.py).
        pg.execute(f"GRANT pg_read_all_stats TO {OWNER}")
        pg.create_database(DB, OWNER)
        bench.body = pointed_at(example_body(), pg.host, pg.port, DB)
        bench.load()
    except BaseException:
        bench.close()
        raise
    return bench
