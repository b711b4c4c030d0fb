"""spec.database.settings confirmed against the connected server's pg_settings (sql/settings_check.py),
on the real throwaway PostgreSQL 15.

The admission allow-list (api/parameters.py) carries PostgreSQL 15's bounds; a server whose bounds
differ (another major version, another build, a managed service) is simulated by loosening the
allow-list, which is exactly the situation: admission accepted a value this server refuses.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.postgres import FreshDatabase
from marketplacedb_operator.api import parameters
from marketplacedb_operator.api.parameters import DATABASE_SETTINGS, Param
from marketplacedb_operator.api.v1alpha1 import MarketplaceDBSpec
from marketplacedb_operator.gateways.postgres import schema as gateway
from marketplacedb_operator.sql import settings_check
from marketplacedb_operator.sql.plan import ExecutionPolicy, desired_state, plan

OWNER = "default/shop"
POLICY = ExecutionPolicy(lock_timeout_seconds=2.0, statement_timeout_seconds=60.0, retries=0)


def _desired(db: FreshDatabase, settings_: dict[str, str]) -> Any:
    spec = MarketplaceDBSpec.model_validate({"database": {
        "host": "db", "dbname": db.name, "credentialsSecretRef": {"name": "owner"}, "settings": settings_}})
    return desired_state(spec, OWNER)


def _database_settings(db: FreshDatabase) -> list[str]:
    with psycopg.connect(db.superuser_dsn) as conn:
        row = conn.execute("SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
                           "WHERE d.datname = %s AND s.setrole = 0", [db.name]).fetchone()
    return sorted(row[0]) if row else []


def test_a_value_this_server_refuses_is_a_precise_conflict_and_nothing_is_applied(
        fresh_db: FreshDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    # An allow-list written for a server whose work_mem may go down to 1 kB (PostgreSQL 15's is 64 kB).
    monkeypatch.setitem(DATABASE_SETTINGS, "work_mem", Param("memory", minimum=1, maximum=2**31 - 1))
    d = _desired(fresh_db, {"work_mem": "32kB", "random_page_cost": "1.1"})
    with fresh_db.connect() as conn:
        the_plan = plan(d, gateway.observe(conn, d))
        outcomes = gateway.execute(conn, the_plan, POLICY)
    assert [s for s in the_plan.steps if s.kind == "set-setting"] == []
    assert the_plan.conflicts == (
        "spec.database.settings.work_mem: '32kB' is outside what this server allows: 64..2147483647 kB "
        "(pg_settings); no database setting was changed",)
    assert all(o.ok for o in outcomes)
    assert _database_settings(fresh_db) == []  # random_page_cost, valid on its own, was not applied either
    # Once the value fits, both are applied.
    d = _desired(fresh_db, {"work_mem": "64kB", "random_page_cost": "1.1"})
    with fresh_db.connect() as conn:
        the_plan = plan(d, gateway.observe(conn, d))
        assert the_plan.conflicts == () and all(o.ok for o in gateway.execute(conn, the_plan, POLICY))
    assert _database_settings(fresh_db) == ["random_page_cost=1.1", "work_mem=64kB"]


def test_a_parameter_this_server_does_not_have_is_refused_by_name(
        fresh_db: FreshDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    # enable_presorted_aggregate came with PostgreSQL 16: an allow-list for 16 admits it, 15 has no such GUC.
    monkeypatch.setitem(DATABASE_SETTINGS, "enable_presorted_aggregate", Param("bool"))
    d = _desired(fresh_db, {"enable_presorted_aggregate": "off", "jit": "off"})
    with fresh_db.connect() as conn:
        the_plan = plan(d, gateway.observe(conn, d))
    assert the_plan.conflicts == ("spec.database.settings.enable_presorted_aggregate: enable_presorted_aggregate is "
                                  "not a parameter of the connected server (pg_settings); no database setting was "
                                  "changed",)
    assert not [s for s in the_plan.steps if s.kind == "set-setting"]


# --- the conversion is the server's: same verdict as set_config, value for value --------------------

def _values(param: Param) -> st.SearchStrategy[str]:
    """Values in the admission forms of api/parameters.py, around the bounds and across units."""
    number = st.one_of(st.integers(0, 3000), st.integers(0, 2**31 + 10),
                       st.sampled_from([param.minimum - 1, param.minimum, param.maximum, param.maximum + 1]))
    if param.kind == "memory":
        return st.builds(lambda n, u: f"{n}{u}", number, st.sampled_from(["", "B", "kB", "MB", "GB", "TB"]))
    if param.kind == "duration_ms":
        return st.builds(lambda n, u: f"{n}{u}", number, st.sampled_from(["", "us", "ms", "s", "min", "h", "d"]))
    if param.kind == "int":
        return number.map(str)
    if param.kind == "float":
        return st.from_regex(r"[0-9]{1,6}(\.[0-9]{1,6})?", fullmatch=True)
    if param.kind == "enum":
        return st.sampled_from([*param.choices, "read uncommitted", "snapshot"])
    return st.sampled_from(["0", "1", "on", "off", "true", "false"])


def _server_accepts(conn: psycopg.Connection[Any], name: str, value: str) -> bool:
    try:
        with conn.transaction():
            conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [name, value])
            raise psycopg.Rollback()
    except psycopg.errors.InvalidParameterValue:
        return False
    return True


@pytest.mark.parametrize("name", sorted(DATABASE_SETTINGS))
def test_settings_check_agrees_with_the_server(fresh_db: FreshDatabase, name: str) -> None:
    with fresh_db.connect() as conn:
        (row,) = conn.execute(settings_check.GUC_FACTS, {"names": [name]}).fetchall()
        facts = settings_check.GucFacts.from_row(row)

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(value=_values(DATABASE_SETTINGS[name]))
        def agree(value: str) -> None:
            try:
                sent = parameters.check_value(DATABASE_SETTINGS[name], value)  # what admission lets through
            except ValueError:
                sent = value  # refused at admission already; the confirmation must still agree with the server
            verdict = settings_check.problem(facts, name, sent)
            assert (verdict == "") == _server_accepts(conn, name, sent), (name, sent, verdict)

        agree()
