"""SQL fragments from a spec, verified with PostgreSQL's own grammar (libpg_query), never regex.

What reaches the database is the parser's deparsed text, not the user's: whatever comments or
tricks the input held, the server runs exactly the statement the parser saw.

Every input gets a verdict (a SqlCheckError with a reason), never another exception: the
binding hands the parse tree over as protobuf, whose decoder refuses trees nested more than
~100 messages deep (about 48 chained operators, or 100 NOTs), and raises a DecodeError that
would otherwise escape validation and crash reconcile() and the CLI.
"""

from __future__ import annotations

from typing import Any

import pg_query

_WRITES = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
_SETOP_NONE = pg_query.pg_query_pb2.SETOP_NONE
_PREDICATE_PREFIX = "SELECT WHERE "
# Fields a bare `SELECT WHERE <expr>` may carry; anything else (OFFSET, FOR UPDATE, INTO, ...) was
# smuggled after the expression.
_PREDICATE_FIELDS = {"where_clause", "op", "limit_option"}
# Bytes: the CRD's maxLength for a view query; a bound here too, so direct callers are bounded.
MAX_SQL_BYTES = 65536
# Operators whose result is not boolean: `a + b` is no predicate.
# (`~` is left out: binary, it is a regex match.)
_NON_BOOLEAN_OPERATORS = {"+", "-", "*", "/", "%", "^", "||", "|", "&", "#", "<<", ">>", "->", "->>", "#>", "#>>"}
_CLAUSES = {
    "limit_offset": "OFFSET",
    "limit_count": "LIMIT",
    "locking_clause": "FOR UPDATE/SHARE",
    "sort_clause": "ORDER BY",
}
_A_EXPR = pg_query.pg_query_pb2.A_Expr_Kind


class SqlCheckError(ValueError):
    """The fragment is not what the field allows; the message says why."""


def _parse(text: str) -> Any:
    if "\x00" in text:
        # libpg_query reads a C string: everything after a NUL would silently vanish (a WHERE too).
        raise SqlCheckError("contains a NUL byte (\\u0000), which would silently cut the text")
    if len(text.encode()) > MAX_SQL_BYTES:
        raise SqlCheckError(f"is longer than {MAX_SQL_BYTES} bytes")
    try:
        return pg_query.parse(text)
    except pg_query.PgQueryError as exc:
        raise SqlCheckError(f"does not parse: {exc.args[0] if exc.args else exc}") from None
    except RecursionError:
        raise SqlCheckError("is nested too deeply to check: simplify it") from None
    except Exception:  # the binding's protobuf DecodeError on deep trees (module-private type)
        raise SqlCheckError(
            "is nested too deeply to check (more than about 45 chained operators or NOTs): simplify it"
        ) from None


def _nodes(message: Any) -> set[str]:
    """Every node type in the tree, by message name ('SelectStmt', 'LockingClause', ...)."""
    return {type(node).__name__ for _, node in pg_query.walk(message)}


def _deparse(result: Any) -> str:
    try:
        return str(pg_query.deparse(result))
    except Exception:  # any failure of the binding is a verdict, not a crash
        raise SqlCheckError("could not be normalized by the parser: simplify it") from None


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
    if "ParamRef" in kinds:
        raise SqlCheckError("has a parameter ($1): a view query takes no parameters")
    writes = sorted(k for k in _WRITES if k in kinds)
    if writes:
        raise SqlCheckError(f"data-modifying statement inside the query ({', '.join(writes)})")
    if not select.target_list and select.op == _SETOP_NONE and not select.values_lists:
        raise SqlCheckError("must return at least one column")
    return _deparse(result)


def _boolean_problem(node: Any) -> str | None:
    """Why `node` is not syntactically a boolean expression, or None when it is.

    Without a catalog the column types are unknown, so a bare column (`id`, `is_active`) or a
    function call is refused: write `is_active = true` or `is_active IS TRUE` (the planner treats
    both like `is_active` when matching queries to the index).
    """
    kind = node.WhichOneof("node")
    if kind is None:
        return "must be a boolean expression"
    inner: Any = getattr(node, kind)
    if kind == "bool_expr":
        for arg in inner.args:
            problem = _boolean_problem(arg)
            if problem:
                return problem
        return None
    if kind in ("null_test", "boolean_test"):
        return None
    if kind == "a_const" and inner.WhichOneof("val") == "boolval":
        return None
    if kind == "type_cast" and [n.string.sval for n in inner.type_name.names][-1:] in (["bool"], ["boolean"]):
        return None
    if kind == "a_expr":
        if inner.kind == _A_EXPR.Value("AEXPR_NULLIF"):
            return "NULLIF(...) is not a boolean expression"
        operator = inner.name[-1].string.sval if inner.name else ""
        if inner.kind == _A_EXPR.Value("AEXPR_OP") and operator in _NON_BOOLEAN_OPERATORS:
            return f"the operator {operator} does not give a boolean"
        return None
    what = {"column_ref": "a bare column", "func_call": "a function call", "a_const": "a constant"}.get(kind, kind)
    return f"must be a boolean expression, found {what} (write e.g. `col = true` or `col IS TRUE`)"


def _prefixed_select(prefix: str, expression: str, plain: str) -> tuple[Any, Any]:
    """(parse result, SelectStmt) of `prefix + expression`: parsed client-side only, never sent. The
    prefix lets the grammar place the expression; what reaches the database is the deparse."""
    result = _parse(prefix + expression)
    if len(result.stmts) != 1:
        raise SqlCheckError("must be one expression, not several statements")
    stmt = result.stmts[0].stmt
    if stmt.WhichOneof("node") != "select_stmt":  # pragma: no cover - the prefix makes it a SELECT
        raise SqlCheckError(f"must be {plain}")
    return result, stmt.select_stmt


def _no_trailing_clause(select: Any, fields: set[str], plain: str) -> None:
    """Fields beyond `fields` (FROM, ORDER BY, a set operation...) were smuggled in after the expression."""
    extra = sorted(f.name for f, _ in select.ListFields() if f.name not in fields)
    if extra or select.op != _SETOP_NONE:
        clauses = ", ".join(_CLAUSES.get(name, name.removesuffix("_clause").upper()) for name in extra)
        raise SqlCheckError(f"must be {plain}, found a trailing clause ({clauses or 'set op'})")


def _no_subquery_or_parameter(kinds: set[str], what: str) -> None:
    if "SubLink" in kinds:
        raise SqlCheckError(f"subqueries are not allowed in an index {what}")
    if "ParamRef" in kinds:
        raise SqlCheckError(f"has a parameter ($1): an index {what} takes no parameters")


def _without_prefix(result: Any, prefix: str) -> str:
    deparsed = _deparse(result)
    if not deparsed.startswith(prefix):  # pragma: no cover - libpg_query contract
        raise SqlCheckError("could not be normalized")
    return deparsed[len(prefix):]


def normalize_predicate(expression: str) -> str:
    """A boolean expression for a partial index's WHERE, deparsed; SqlCheckError otherwise."""
    result, select = _prefixed_select(_PREDICATE_PREFIX, expression, "a plain boolean expression")
    if not select.HasField("where_clause"):
        raise SqlCheckError("must not be empty")
    _no_trailing_clause(select, _PREDICATE_FIELDS, "a plain boolean expression")
    _no_subquery_or_parameter(_nodes(select.where_clause), "predicate")
    problem = _boolean_problem(select.where_clause)
    if problem:
        raise SqlCheckError(problem)
    return _without_prefix(result, _PREDICATE_PREFIX)


_EXPRESSION_PREFIX = "SELECT "
# Fields a bare `SELECT <expr>` may carry; anything else (FROM, WHERE, ORDER BY...) was smuggled in.
_EXPRESSION_FIELDS = {"target_list", "op", "limit_option"}


def normalize_expression(expression: str) -> str:
    """One scalar expression for an index key column (`lower(email)`, `(attributes ->> 'brand')`),
    deparsed; SqlCheckError otherwise. The server still decides whether it is immutable."""
    result, select = _prefixed_select(_EXPRESSION_PREFIX, expression, "a plain expression")
    _no_trailing_clause(select, _EXPRESSION_FIELDS, "one plain expression")
    if len(select.target_list) != 1:
        raise SqlCheckError(f"must be exactly one expression, found {len(select.target_list)}")
    target = select.target_list[0].res_target
    if target.name:
        raise SqlCheckError("must not carry an alias (AS ...)")
    kinds = _nodes(target.val)
    _no_subquery_or_parameter(kinds, "expression")
    if "A_Star" in kinds:
        raise SqlCheckError("`*` is not an expression")
    return _without_prefix(result, _EXPRESSION_PREFIX)
