"""A conservative static cost estimate of the CRD's CEL rules, as the API server computes it.

The API server (apiextensions-apiserver) refuses a CRD whose rule may cost more than
StaticEstimatedCostLimit (10,000,000) once multiplied by how often it can run (the product of
maxItems/maxProperties of the lists and maps above it), or whose rules together may cost more
than StaticEstimatedCRDCostLimit (100,000,000). No Python library computes cel-go's estimate,
so this one follows cel-go's cost model (checker/cost.go) and rounds every choice up:

- every call, field selection, index and operator costs 1; a list literal 10;
- string comparisons cost 0.1 per character of the shorter side (cel-go's traversal factor),
  rounded up; `matches` costs ceil(0.1 * string size) * ceil(0.25 * regex size);
- `in` over a list costs one comparison per element;
- a comprehension (all, exists, exists_one, map, filter) costs its range plus, per element,
  its body plus 3 (loop condition and step);
- both branches of `? :`, `&&` and `||` are added (cel-go takes the larger branch);
- a string without maxLength or a key of a map counts as 3 MiB (the request size limit).

So the estimate is at least cel-go's: a CRD that passes here passes the API server's check.
Parsing is cel-python's (the grammar of the CEL spec).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import celpy
from lark import Token, Tree

STATIC_ESTIMATED_COST_LIMIT = 10_000_000
STATIC_ESTIMATED_CRD_COST_LIMIT = 100_000_000
UNBOUNDED = 3 * 1024 * 1024
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_PASS_THROUGH = {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary",
                 "member", "primary", "paren_expr"}


@dataclasses.dataclass
class Shape:
    """What the estimator knows of a value: its schema and its maximum size."""

    schema: dict[str, Any] | None = None
    size: int = 1  # characters of a string, elements of a list or map
    element: Shape | None = None  # a list literal's elements


def _shape_of(schema: dict[str, Any] | None) -> Shape:
    if schema is None:
        return Shape(None, UNBOUNDED)
    kind = schema.get("type")
    if kind == "string" or schema.get("x-kubernetes-int-or-string"):
        return Shape(schema, int(schema.get("maxLength", UNBOUNDED)))
    if kind == "array":
        return Shape(schema, int(schema.get("maxItems", UNBOUNDED)))
    if kind == "object" and "additionalProperties" in schema:
        return Shape(schema, int(schema.get("maxProperties", UNBOUNDED)))
    return Shape(schema, 1)


def _element(shape: Shape) -> Shape:
    schema = shape.schema or {}
    if shape.element is not None:
        return shape.element
    if schema.get("type") == "array":
        return _shape_of(schema.get("items"))
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return Shape({"type": "string"}, UNBOUNDED)  # iterating a map yields its keys
    return Shape(None, UNBOUNDED)


def _field(shape: Shape, name: str) -> Shape:
    schema = shape.schema or {}
    if name in schema.get("properties", {}):
        return _shape_of(schema["properties"][name])
    if isinstance(schema.get("additionalProperties"), dict):
        return _shape_of(schema["additionalProperties"])
    return Shape(None, UNBOUNDED)


def _traverse(size: int) -> int:
    return math.ceil(size * 0.1)


class Estimator:
    def __init__(self, self_schema: dict[str, Any]) -> None:
        self.scope: dict[str, Shape] = {"self": _shape_of(self_schema)}

    def cost(self, node: Any) -> tuple[int, Shape]:
        if isinstance(node, Token):
            return 0, Shape(None, 1)
        handler = getattr(self, f"_{node.data}", None)
        if handler is not None:
            result: tuple[int, Shape] = handler(node)
            return result
        # Pass-through productions (expr, conditionalor, relation, addition, ...): one child is the
        # value; several children are an operator application (cost 1 plus the operands).
        # An operator node (relation_eq, addition_add, ...) wraps its left operand; the parent
        # production holds the right one and charges the operation.
        children = [c for c in node.children if isinstance(c, Tree)]
        if len(children) == 1 and (node.data in _PASS_THROUGH or "_" in node.data):
            return self.cost(children[0])
        total, shapes = 1, []
        for child in children:
            cost, shape = self.cost(child)
            total += cost
            shapes.append(shape)
        return total, shapes[-1] if shapes else Shape()

    def _relation(self, node: Tree) -> tuple[int, Shape]:
        children = [c for c in node.children if isinstance(c, Tree)]
        if len(children) == 1:
            return self.cost(children[0])
        left, right = children
        operator = left.data
        lcost, lshape = self.cost(left)
        rcost, rshape = self.cost(right)
        if operator == "relation_in":
            element = _element(rshape)
            per = 1 + _traverse(min(lshape.size, element.size))
            return 1 + lcost + rcost + rshape.size * per, Shape({"type": "boolean"})
        return 1 + lcost + rcost + _traverse(min(lshape.size, rshape.size)), Shape({"type": "boolean"})

    def _expr(self, node: Tree) -> tuple[int, Shape]:
        children = [c for c in node.children if isinstance(c, Tree)]
        costs = [self.cost(c) for c in children]
        if len(costs) == 1:
            return costs[0]
        # cond ? a : b, counted with both branches.
        return 1 + sum(c for c, _ in costs), costs[1][1]

    def _ident(self, node: Tree) -> tuple[int, Shape]:
        return 1, self.scope.get(str(node.children[0]), Shape(None, UNBOUNDED))

    def _literal(self, node: Tree) -> tuple[int, Shape]:
        text = str(node.children[0])
        return 0, Shape({"type": "string"} if text[:1] in "'\"" else None, max(len(text) - 2, 1))

    def _list_lit(self, node: Tree) -> tuple[int, Shape]:
        items = list(_exprs(node))
        costs = [self.cost(item) for item in items]
        biggest = max((s.size for _, s in costs), default=1)
        return 10 + sum(c for c, _ in costs), Shape({"type": "array"}, len(items), Shape({"type": "string"}, biggest))

    def _member_dot(self, node: Tree) -> tuple[int, Shape]:
        target, name = node.children
        cost, shape = self.cost(target)
        return 1 + cost, _field(shape, str(name))

    def _member_index(self, node: Tree) -> tuple[int, Shape]:
        target, index = node.children
        tcost, tshape = self.cost(target)
        icost, _ = self.cost(index)
        return 1 + tcost + icost, _element(tshape) if (tshape.schema or {}).get("type") == "array" else _field(
            tshape, "")

    def _ident_arg(self, node: Tree) -> tuple[int, Shape]:
        name = str(node.children[0])
        args = list(_exprs(node))
        costs = [self.cost(arg) for arg in args]
        total = 1 + sum(c for c, _ in costs)
        if name in ("int", "string") and costs:
            total += _traverse(costs[0][1].size)
        return total, Shape({"type": "integer" if name in ("size", "int") else "string"})

    def _member_dot_arg(self, node: Tree) -> tuple[int, Shape]:
        target, method = node.children[0], str(node.children[1])
        args = list(_exprs(node))
        tcost, tshape = self.cost(target)
        if method in _MACROS:
            variable = str(_first_ident(args[0]))
            saved = self.scope.get(variable)
            self.scope[variable] = _element(tshape)
            try:
                body = sum(self.cost(arg)[0] for arg in args[1:])
            finally:
                if saved is None:
                    self.scope.pop(variable, None)
                else:
                    self.scope[variable] = saved
            return tcost + tshape.size * (body + 3), Shape({"type": "array"}, tshape.size, _element(tshape))
        costs = [self.cost(arg) for arg in args]
        total = 1 + tcost + sum(c for c, _ in costs)
        if method == "matches":
            total += _traverse(tshape.size) * math.ceil(costs[0][1].size * 0.25)
        elif method in ("startsWith", "endsWith", "contains"):
            total += _traverse(tshape.size)
        return total, Shape({"type": "boolean"})


def _exprs(node: Tree) -> Iterator[Tree]:
    for child in node.children:
        if isinstance(child, Tree) and child.data == "exprlist":
            yield from (c for c in child.children if isinstance(c, Tree))


def _first_ident(node: Tree) -> str:
    for sub in node.iter_subtrees_topdown():
        if sub.data == "ident":
            return str(sub.children[0])
    raise ValueError("a macro needs a variable")


def rule_cost(rule: str, self_schema: dict[str, Any]) -> int:
    tree = celpy.Environment().compile(rule)
    cost, _ = Estimator(self_schema).cost(tree)
    return cost


@dataclasses.dataclass
class RuleCost:
    path: str
    rule: str
    cost: int  # one evaluation
    cardinality: int  # how many times it may run per object

    @property
    def total(self) -> int:
        return self.cost * self.cardinality


def crd_rule_costs(schema: dict[str, Any], path: str = "", cardinality: int = 1) -> list[RuleCost]:
    """Every rule in the schema with its estimated cost and cardinality."""
    found = [RuleCost(path or "(root)", r["rule"], rule_cost(r["rule"], schema), cardinality)
             for r in schema.get("x-kubernetes-validations", [])]
    for name, child in schema.get("properties", {}).items():
        found += crd_rule_costs(child, f"{path}.{name}", cardinality)
    if isinstance(schema.get("items"), dict):
        found += crd_rule_costs(schema["items"], f"{path}[]", cardinality * int(schema.get("maxItems", UNBOUNDED)))
    if isinstance(schema.get("additionalProperties"), dict):
        found += crd_rule_costs(schema["additionalProperties"], f"{path}{{}}",
                                cardinality * int(schema.get("maxProperties", UNBOUNDED)))
    return found
