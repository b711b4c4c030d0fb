"""Scenario 5: building an index on a table that is being written to.

A plain `CREATE INDEX` (what a migration tool runs by default) takes a SHARE lock: every write to
the table waits until the build ends. The operator's executor (the code behind `marketplacedb
apply`) builds `CONCURRENTLY`. Writes (a sale: `UPDATE seller_products SET sold_count + 1`) run
at a fixed rate; the figure is the longest write in flight during the build.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from psycopg import sql

from marketplacedb_operator.api.v1alpha1 import IndexSpec, MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import ConnInfo, connect
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.settings import Settings
from marketplacedb_operator.sql.plan import ExecutionPolicy, desired_state, owner_of, plan

from .. import pgbench
from ..env import Workbench
from ..scripts import Scripts
from .background import Background, window_figures

WRITE_RATE = 500
WRITE_CLIENTS = 8
INDEX = IndexSpec.model_validate({"name": "idx_seller_products_price", "table": "seller_products",
                                  "columns": [{"name": "price"}, {"name": "id"}]})
PLAIN_NAME = "idx_seller_products_price_plain"


def _apply(bench: Workbench, spec: MarketplaceDBSpec) -> list[Any]:
    """Plan and execute `spec` exactly as `marketplacedb apply` does (same functions, same policy)."""
    meta = bench.body["metadata"]
    info = ConnInfo.from_dsn(bench.dsn())
    with connect(info) as conn:
        desired = desired_state(spec, owner_of(meta.get("namespace"), meta["name"]))
        the_plan = plan(desired, gateway.observe(conn, desired))
        policy = ExecutionPolicy.from_spec(spec.ddl, Settings())
        return gateway.execute(conn, the_plan, policy, watch=lambda: connect(info))


def _with_index(spec: MarketplaceDBSpec) -> MarketplaceDBSpec:
    return spec.model_copy(update={"indexes": [*spec.indexes, INDEX]})


def _concurrent(bench: Workbench) -> None:
    outcomes = _apply(bench, _with_index(bench.spec))
    built = [o for o in outcomes if o.object.endswith(INDEX.name)]
    if not built or not all(o.ok for o in built):
        raise RuntimeError(f"the concurrent build failed: {outcomes}")


def _plain(bench: Workbench) -> None:
    with bench.connect() as conn:
        conn.execute(sql.SQL("CREATE INDEX {} ON seller_products (price, id)").format(sql.Identifier(PLAIN_NAME)))


def _cleanup(bench: Workbench) -> None:
    # Ours and no longer declared: with deletionPolicy Drop, the plan drops it CONCURRENTLY.
    spec = bench.spec
    _apply(bench, spec.model_copy(update={"ddl": spec.ddl.model_copy(update={"deletion_policy": "Drop"})}))
    with bench.connect() as conn:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(PLAIN_NAME)))


def under_writes(bench: Workbench, scripts: Scripts, *, seconds: float, lead: float, number: int = 1) -> dict[str, Any]:
    """One run: each build under a write load of its own, `lead` s in; the order alternates."""
    modes = [("plain", _plain), ("concurrent", _concurrent)]
    if number % 2 == 0:
        modes.reverse()
    result: dict[str, Any] = {"order": "/".join(mode for mode, _ in modes)}
    for mode, build in modes:
        load = Background(functools.partial(pgbench.run, f"writes-{mode}", bench.direct(), scripts.one("sale"),
                                            clients=WRITE_CLIENTS, rate=WRITE_RATE, seconds=seconds))
        time.sleep(lead)
        start = time.time()
        build(bench)
        end = time.time()
        writes = load.join()
        _cleanup(bench)
        result |= {f"{mode}_build_s": end - start, f"{mode}_writes": writes.processed,
                   f"{mode}_inside_load": bool(writes.completions) and end < max(writes.completions)}
        result |= window_figures(writes, start, end, mode)
    return result
