"""MarketplaceDB spec, indexes: methods, operator classes (and the extensions that provide them), key
columns and expressions, storage parameters, partial and covering indexes."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ..sqlcheck import SqlCheckError, normalize_expression, normalize_predicate
from .bounds import cel
from .types import AdoptPolicy, Identifier, Model, check_unique, in_list, not_temporary, unique_rule

IndexMethod = Literal["btree", "hash", "gin", "gist", "brin"]

# Operator classes a spec may name, by index method (an allow-list: an opclass name becomes an SQL
# identifier, and each one listed here is known to PostgreSQL 15 or to the extension named in
# EXTENSION_OF_OPCLASS). Built-in default classes need no opclass at all.
OPCLASSES: dict[str, frozenset[str]] = {
    "btree": frozenset({"text_pattern_ops", "varchar_pattern_ops", "bpchar_pattern_ops"}),
    "hash": frozenset(),
    "gin": frozenset({"jsonb_ops", "jsonb_path_ops", "array_ops", "tsvector_ops", "gin_trgm_ops",
                      "int2_ops", "int4_ops", "int8_ops", "float4_ops", "float8_ops", "numeric_ops",
                      "text_ops", "varchar_ops", "bool_ops", "date_ops", "timestamp_ops", "timestamptz_ops",
                      "uuid_ops"}),
    "gist": frozenset({"gist_trgm_ops", "range_ops", "inet_ops", "tsvector_ops", "point_ops", "box_ops"}),
    "brin": frozenset({"int4_minmax_ops", "int8_minmax_ops", "date_minmax_ops", "timestamp_minmax_ops",
                       "timestamptz_minmax_ops", "numeric_minmax_ops", "int4_minmax_multi_ops",
                       "int8_minmax_multi_ops", "timestamptz_minmax_multi_ops", "timestamptz_bloom_ops",
                       "text_bloom_ops", "uuid_bloom_ops", "int8_bloom_ops", "inet_inclusion_ops",
                       "range_inclusion_ops"}),
}
_ALL_OPCLASSES = sorted(set().union(*OPCLASSES.values()))
# (method, opclass) -> the extension that provides it (a missing one blocks the index, see plan.py).
_BTREE_GIN = {"int2_ops", "int4_ops", "int8_ops", "float4_ops", "float8_ops", "numeric_ops", "text_ops",
              "varchar_ops", "bool_ops", "date_ops", "timestamp_ops", "timestamptz_ops", "uuid_ops"}
EXTENSION_OF_OPCLASS: dict[tuple[str, str], str] = {
    ("gin", "gin_trgm_ops"): "pg_trgm",
    ("gist", "gist_trgm_ops"): "pg_trgm",
    **{("gin", name): "btree_gin" for name in _BTREE_GIN},
}


class IndexColumn(Model):
    """One key column of an index: a column `name` or an `expression`, with an optional operator class."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.name) != has(self.expression)", "set exactly one of name and expression"),
        )
    )

    name: Identifier | None = Field(None, description="Column name (or set expression).")
    expression: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="An expression instead of a column (e.g. `lower(email)`), checked by PostgreSQL's parser; "
        "the deparsed text is what runs. One scalar expression: no subqueries, parameters or clauses.",
    )
    opclass: str | None = Field(
        None,
        max_length=63,
        description="Operator class (e.g. gin_trgm_ops, jsonb_path_ops, text_pattern_ops): one of "
        f"{', '.join(_ALL_OPCLASSES)}; which ones a method accepts is checked. gin_trgm_ops and gist_trgm_ops need "
        "the pg_trgm extension, the scalar gin classes (int4_ops, text_ops...) btree_gin.",
        json_schema_extra=cel((f"self in {in_list(_ALL_OPCLASSES)}", "opclass: only the allow-listed names")),
    )
    order: Literal["asc", "desc"] = Field("asc", description="Sort order (btree only).")
    nulls: Literal["first", "last"] | None = Field(
        None, description="NULLS FIRST/LAST (btree only; default: PostgreSQL's)."
    )

    @field_validator("expression")
    @classmethod
    def _expression(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize_expression(value)
        except SqlCheckError as exc:
            raise ValueError(f"expression {exc}") from None

    @model_validator(mode="after")
    def _one_of(self) -> IndexColumn:
        if (self.name is None) == (self.expression is None):
            raise ValueError("set exactly one of name and expression")
        if self.opclass is not None and self.opclass not in _ALL_OPCLASSES:
            raise ValueError(f"opclass {self.opclass!r} is not one of {', '.join(_ALL_OPCLASSES)}")
        return self

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"({self.expression})"


class IndexStorage(Model):
    """Index storage parameters that matter (WITH (...)); each applies to some methods only."""

    fillfactor: int | None = Field(None, ge=10, le=100, description="Leaf page fill percentage (btree, hash, gist).")
    pages_per_range: int | None = Field(
        None, ge=1, le=131072, description="Table pages summarised per BRIN range (brin only)."
    )
    fastupdate: bool | None = Field(None, description="GIN pending list for faster inserts (gin only).")


_STORAGE_METHODS = {"fillfactor": ("btree", "hash", "gist"), "pages_per_range": ("brin",), "fastupdate": ("gin",)}


class IndexSpec(Model):
    """An index (btree, hash, gin, gist or brin), built and dropped CONCURRENTLY; partial (where),
    covering (include), on columns or expressions, with operator classes and storage parameters."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.include) || "
                "self.include.all(n, !self.columns.filter(c, has(c.name)).exists(c, c.name == n))",
                "include must not repeat key columns",
            ),
        )
    )

    name: Identifier = Field(description="Index name (unique in the schema).")
    _name_not_temporary = field_validator("name")(not_temporary)
    table: Identifier = Field(description="Table name.")
    schema_name: Identifier = Field("public", alias="schema", description="Schema of the table.")
    columns: list[IndexColumn] = Field(
        min_length=1,
        max_length=32,
        description="Key columns in order (hash: exactly one).",
        json_schema_extra=cel((
            "self.filter(a, has(a.name)).all(a, self.filter(b, has(b.name)).exists_one(b, b.name == a.name))",
            "columns must not repeat a column",
        )),
    )
    method: IndexMethod = Field(
        "btree",
        description="Index method: btree, hash (equality, one column), gin (jsonb, arrays, trigram search), "
        "gist, brin (large append-only tables).",
    )
    storage: IndexStorage | None = Field(None, description="Storage parameters (WITH (...)).")
    where: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Partial-index predicate: one boolean expression (e.g. `is_active = true`), checked by "
        "PostgreSQL's parser; no subqueries, parameters or trailing clauses. Nested at most about 45 operators deep.",
    )
    include: list[Identifier] = Field(
        default_factory=list,
        max_length=32,
        description="Covering (INCLUDE) columns.",
        json_schema_extra=cel(unique_rule("", "include must not repeat a column")),
    )
    unique: bool = Field(False, description="UNIQUE index.")
    adopt: AdoptPolicy = Field(
        "IfIdentical",
        description="An existing index of this name that the operator did not create: IfIdentical adopts it "
        "only when its definition equals this one (else Conflict, left alone); Replace rebuilds it "
        "CONCURRENTLY under a temporary name, swaps it in and drops the old one.",
    )

    @field_validator("where")
    @classmethod
    def _where(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return normalize_predicate(value)
        except SqlCheckError as exc:
            raise ValueError(f"predicate {exc}") from None

    @model_validator(mode="after")
    def _columns(self) -> IndexSpec:
        check_unique([c for c in self.columns if c.name is not None], "name", "column")
        keys = {c.name for c in self.columns if c.name is not None}
        clash = sorted(keys.intersection(self.include))
        if clash:
            raise ValueError(f"include repeats key columns {clash}")
        if len(set(self.include)) != len(self.include):
            raise ValueError("include has duplicate columns")
        self._method_fits()
        return self

    def _method_fits(self) -> None:
        method = self.method
        if self.unique and method != "btree":
            raise ValueError(f"unique: only btree indexes can be unique, not {method}")
        if self.include and method not in ("btree", "gist"):
            raise ValueError(f"include: {method} indexes have no INCLUDE columns (btree and gist only)")
        if method == "hash" and len(self.columns) != 1:
            raise ValueError("columns: a hash index has exactly one column")
        for number, column in enumerate(self.columns):
            if method != "btree" and (column.order != "asc" or column.nulls is not None):
                raise ValueError(f"columns[{number}]: order and nulls apply to btree only, not {method}")
            if column.opclass is not None and column.opclass not in OPCLASSES[method]:
                raise ValueError(f"columns[{number}].opclass: {column.opclass!r} is not a {method} operator class "
                                 f"(allowed: {', '.join(sorted(OPCLASSES[method])) or 'none'})")
        if self.storage is not None:
            for field, methods in _STORAGE_METHODS.items():
                if getattr(self.storage, field) is not None and method not in methods:
                    raise ValueError(f"storage.{field} applies to {', '.join(methods)} indexes, not {method}")

    @property
    def extensions(self) -> tuple[str, ...]:
        """Extensions the index needs (from its operator classes)."""
        needed = {EXTENSION_OF_OPCLASS.get((self.method, c.opclass or "")) for c in self.columns}
        return tuple(sorted(e for e in needed if e))
