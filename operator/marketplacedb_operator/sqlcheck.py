"""SQL fragments from a spec, verified with PostgreSQL's own grammar (libpg_query), never regex.

What reaches the database is the parser's deparsed text, not the user's: whatever comments or
tricks the input held, the server runs exactly the statement the parser saw.
"""

from __future__ import annotations

from typing import Any

import pg_query

_WRITES = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
_SETOP_NONE = pg_query.pg_query_pb2.SETOP_NONE
_PREDICATE_PREFIX = "SELECT WHERE "


class SqlCheckError(ValueError):
    """The fragment is not what the field allows; the message says why."""


def _parse(text: str) -> Any:
    try:
        return pg_query.parse(text)
    except pg_query.PgQueryError as exc:
        raise SqlCheckError(f"does not parse: {exc.args[0] if exc.args else exc}") from None


def _nodes(message: Any) -> set[str]:
    """Every node type in the tree, by message name ('SelectStmt', 'LockingClause', ...)."""
    return {type(node).__name__ for _, node in pg_query.walk(message)}


def normalize_select(query: str) -> str:
    """Exactly one plain SELECT, deparsed; SqlCheckError otherwise."""
    result = _parse(query)
    if len(result.stmts) != 1:
        raise SqlCheckError(f"must be exactly one statement, found {len(result.stmts)}")
    stmt = result.stmts[0].stmt
    if stmt.WhichOneof("node") != "select_stmt":
        raise SqlCheckError(f"must be a SELECT, found {stmt.WhichOneof('node')}")
    select = stmt.select_stmt
    kinds = _nodes(select)
    if "IntoClause" in kinds:
        raise SqlCheckError("SELECT ... INTO creates a table; a view query must not")
    if "LockingClause" in kinds:
        raise SqlCheckError("FOR UPDATE/SHARE takes row locks; a view query must not")
    writes = sorted(k for k in _WRITES if k in kinds)
    if writes:
        raise SqlCheckError(f"data-modifying statement inside the query ({', '.join(writes)})")
    if not select.target_list and select.op == _SETOP_NONE and not select.values_lists:
        raise SqlCheckError("must return at least one column")
    return str(pg_query.deparse(result))


def normalize_predicate(expression: str) -> str:
    """A boolean expression for a partial index's WHERE, deparsed; SqlCheckError otherwise."""
    # Parsed client-side only, never sent: the expression is wrapped so the grammar can place it,
    # and what reaches the database is the deparsed predicate returned below.
    result = _parse(_PREDICATE_PREFIX + expression)
    if len(result.stmts) != 1:
        raise SqlCheckError("must be one expression, not several statements")
    select = result.stmts[0].stmt.select_stmt
    extra = [
        name
        for name in ("from_clause", "group_clause", "sort_clause", "window_clause", "target_list")
        if getattr(select, name)
    ]
    has_limit = any(select.HasField(name) for name in ("limit_count", "having_clause", "with_clause"))
    if extra or has_limit or select.op != _SETOP_NONE:
        raise SqlCheckError("must be a plain boolean expression")
    if not select.HasField("where_clause"):
        raise SqlCheckError("must not be empty")
    if "SubLink" in _nodes(select.where_clause):
        raise SqlCheckError("subqueries are not allowed in an index predicate")
    deparsed = str(pg_query.deparse(result))
    prefix = _PREDICATE_PREFIX
    if not deparsed.startswith(prefix):  # pragma: no cover - libpg_query contract
        raise SqlCheckError("could not be normalized")
    return deparsed[len(prefix) :]
