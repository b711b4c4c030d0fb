"""Observe the catalog for one resource (READ ONLY), and ask the server what declared objects would
look like (adoption probes, rolled back). See sql/catalog_sql.py for what is read and why."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from ...sql import ownership, refresh_guard
from ...sql.catalog import (
    ATTACHED,
    EXTENSIONS,
    NO_DEFAULT_OPCLASS,
    PARTITIONS,
    Catalog,
    observe_params,
    observe_query,
    parse_catalog,
)
from ...sql.ddl import create_index, qualified, temp_name
from ...sql.plan import Desired, observed_names
from ...sql.plan_partitions import observed_child_names
from ...sql.settings_check import GUC_FACTS, GucFacts
from ...sqlcheck import normalize_select
from .refresh import analyze_views

Connection = psycopg.Connection[Any]


class ObservationFailed(Exception):
    """The catalog could not be read; the message is safe for status and events."""


# The operator's own sessions never inherit a database- or role-level statement_timeout or
# lock_timeout (ALTER DATABASE ... SET statement_timeout = 1 would otherwise lock it out of its
# own catalog reads): every transaction it runs sets both, locally.
OBSERVE_LOCK_TIMEOUT_MS = 5000
OBSERVE_STATEMENT_TIMEOUT_MS = 60000


def _pin_session(conn: Connection, lock_ms: int = OBSERVE_LOCK_TIMEOUT_MS,
                 statement_ms: int = OBSERVE_STATEMENT_TIMEOUT_MS) -> None:
    conn.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true), "
                 "pg_catalog.set_config('statement_timeout', %s, true), "
                 "pg_catalog.set_config('idle_in_transaction_session_timeout', '0', true)",
                 [str(lock_ms), str(statement_ms)])


def observe(conn: Connection, desired: Desired) -> Catalog:
    """One READ ONLY snapshot of what `desired` needs to know (catalog.OBSERVE: declared names,
    their temporaries, this resource's recorded objects; nothing of anyone else's), plus the
    definitions the declared objects would have, for adoption (expected_signatures)."""
    # The view queries are analyzed and probed by this session: never resolve a name through a
    # "$user" schema another role planted (refresh_guard.SAFE_SEARCH_PATH).
    conn.execute(refresh_guard.safe_search_path_sql(local=False))
    with conn.transaction():
        # Never wait long: pg_get_viewdef locks the relations a view reads, so a declared table
        # held under ACCESS EXCLUSIVE (VACUUM FULL, ALTER TABLE) fails fast with a clear error.
        _pin_session(conn)
        conn.execute("SET TRANSACTION READ ONLY")
        # Pinned so that pg_get_indexdef/pg_get_viewdef are fully qualified (see ddl.mark).
        conn.execute("SET LOCAL search_path = pg_catalog")
        # Every observation first checks the ownership table may be trusted (ownership.TRUST): its
        # rows decide what is dropped, so a table another role can write is refused outright.
        trust = conn.execute(ownership.TRUST).fetchone()
        if trust is None or trust[1]:
            raise ObservationFailed(ownership.distrust(list(trust[1]) if trust else ["unreadable"]))
        tables = sorted({(d.spec.schema_name, d.spec.table) for d in desired.indexes})
        partitions = tuple(tuple(r) for r in conn.execute(PARTITIONS, {"schemas": [s for s, _ in tables],
                                                                       "names": [n for _, n in tables]}))
        # The names a partition's index of a declared index may take are read like its temporaries.
        names = observed_names(desired) + observed_child_names(desired, partitions)
        cur = conn.execute(observe_query(bool(trust[0])), observe_params(desired.owner, names))
        row = cur.fetchone()
        found = conn.execute(EXTENSIONS).fetchone()
        plain = [(d.spec.schema_name, d.spec.table, c.name, d.spec.method) for d in desired.indexes
                 if d.spec.method in ("gin", "gist") for c in d.spec.columns if c.name and not c.opclass]
        no_default = conn.execute(NO_DEFAULT_OPCLASS, {
            "schemas": [p[0] for p in plain], "tables": [p[1] for p in plain], "columns": [p[2] for p in plain],
            "methods": [p[3] for p in plain]}).fetchall() if plain else []
        gucs = conn.execute(GUC_FACTS, {"names": [name for name, _ in desired.settings]}).fetchall()
    if row is None:  # pragma: no cover - the statement always returns one row
        raise ObservationFailed("catalog observation returned nothing")
    catalog = parse_catalog(row[0])
    if found is not None:
        catalog = dataclasses.replace(catalog, extensions=tuple(found[0]), creatable_extensions=tuple(found[1]))
    catalog = dataclasses.replace(catalog, partitions=partitions, gucs=tuple(GucFacts.from_row(r) for r in gucs),
                                  no_default_opclass=tuple((str(a), str(b), str(c), str(m), str(t))
                                                           for a, b, c, m, t in no_default))
    attached = _attached(conn, desired, catalog)
    catalog = dataclasses.replace(catalog, attached=tuple(row[:6] for row in attached),
                                  invalid_children=tuple((row[2], row[3]) for row in attached if not row[6]))
    uncompared: list[tuple[tuple[str, str], str]] = []
    expected = expected_signatures(conn, desired, catalog, uncompared)
    calls, unanalyzed = analyze_views(conn, desired, catalog)  # what each view's query calls (plan refusal)
    return dataclasses.replace(catalog, expected=expected, uncompared=tuple(sorted(uncompared)), calls=calls,
                               unanalyzed=unanalyzed)


def _attached(conn: Connection, desired: Desired, catalog: Catalog) -> tuple[tuple[Any, ...], ...]:
    """Partition indexes attached to the declared indexes and to those recorded as this resource's
    (and whether each is valid)."""
    declared = [(d.spec.schema_name, d.spec.name) for d in desired.indexes]
    owned = [i.oid for i in catalog.indexes if i.owned_by(desired.owner) and i.table_kind == "p"]
    with conn.transaction():
        _pin_session(conn)
        rows = conn.execute(ATTACHED, {"schemas": [s for s, _ in declared], "names": [n for _, n in declared],
                                       "owned": owned}).fetchall()
    return tuple(tuple(r) for r in rows)


@contextlib.contextmanager
def _probe(failures: list[tuple[tuple[str, str], str]] | None, schema: str, name: str) -> Iterator[None]:
    """A failed probe leaves no signature; its reason (primary message and SQLSTATE) is kept."""
    try:
        yield
    except psycopg.Error as exc:
        if failures is not None:
            primary = exc.diag.message_primary or type(exc).__name__
            failures.append(((schema, name), f"{primary} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else primary))


def expected_signatures(conn: Connection, desired: Desired, catalog: Catalog,
                        failures: list[tuple[tuple[str, str], str]] | None = None,
                        ) -> tuple[tuple[tuple[str, str], str], ...]:
    """What each declared object found under its name but not ours would look like if the operator
    had made it, deparsed by this server: the index built on an empty temporary copy of its table's
    columns, the query as a temporary view. Rolled back: nothing is left, no data is read. An object
    the probe cannot reproduce (no TEMP privilege, a read-only transaction, a missing column) gets no
    signature and is never adopted; why goes to `failures` (reported as "could not be compared")."""
    indexes = [(d.spec.name, d) for d in desired.indexes
               if (found_index := catalog.index(d.spec.schema_name, d.spec.name)) is not None
               and not found_index.owned_by(desired.owner)]
    # A valid index at a declared index's temporary name bound only by our build's intent (the
    # operator died before it could pin the OID, and the build finished): compared like adoption.
    indexes += [(temp_name(d.spec.name), d) for d in desired.indexes
                if (left := catalog.index(d.spec.schema_name, temp_name(d.spec.name))) is not None
                and left.owned_by(desired.owner) and left.valid and left.record is not None
                and left.record.how == "building" and not left.record.pinned and left.record.spec_hash == d.hash]
    views = [d for d in desired.views if (found_view := catalog.view(d.spec.schema_name, d.spec.name))
             is not None and not found_view.owned_by(desired.owner)]
    found: list[tuple[tuple[str, str], str]] = []
    if not indexes and not views:
        return ()
    with conn.transaction():
        _pin_session(conn)
        saved = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
        path = str(saved[0]) if saved else "\"$user\", public"
        for number, (key, d) in enumerate(indexes):
            table, name = f"mdb_probe_table_{number}", f"mdb_probe_index_{number}"
            with _probe(failures, d.spec.schema_name, key), conn.transaction():
                conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {})").format(
                    sql.Identifier(table), qualified(d.spec.schema_name, d.spec.table)))
                probe = d.spec.model_copy(update={"schema_name": "pg_temp", "table": table})
                conn.execute(create_index(probe, name, concurrently=False))  # an empty temporary table
                # Read with search_path pinned to pg_catalog, as OBSERVE reads the live index: an
                # operator class or function from an extension (public.gin_trgm_ops) is then
                # qualified alike on both sides. The path is put back for the next probe.
                row = conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true), "
                                   "CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END || "
                                   "pg_catalog.substring(pg_catalog.pg_get_indexdef(i.indexrelid), ' USING .*$'), "
                                   "pg_catalog.set_config('search_path', %s, true) "
                                   "FROM pg_catalog.pg_index i WHERE i.indexrelid = pg_catalog.to_regclass(%s)",
                                   [path, f"pg_temp.{name}"]).fetchone()
                if row and row[1]:
                    found.append(((d.spec.schema_name, key), str(row[1])))
        for number, view in enumerate(views):
            name = f"mdb_probe_view_{number}"
            with _probe(failures, view.spec.schema_name, view.spec.name), conn.transaction():
                conn.execute(sql.SQL("CREATE TEMPORARY VIEW {} AS {}").format(
                    sql.Identifier(name), sql.SQL(normalize_select(view.spec.query))))
                # Fully qualified, as OBSERVE reads the live view; the path is put back for the next
                # probe (a SET LOCAL would outlive this savepoint).
                row = conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true), "
                                   "pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to("
                                   "pg_catalog.pg_get_viewdef(pg_catalog.to_regclass(%s)), 'UTF8')), 'hex'), "
                                   "pg_catalog.set_config('search_path', %s, true)",
                                   [f"pg_temp.{name}", path]).fetchone()
                if row and row[1]:
                    found.append(((view.spec.schema_name, view.spec.name), str(row[1])))
        raise psycopg.Rollback()
    return tuple(sorted(found))
