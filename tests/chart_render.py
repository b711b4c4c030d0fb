"""Render the Helm chart in Python, for tests on machines without Helm.

Helm cannot run here (no binary, no registry that ships one for this Python), so this module
implements the small subset of Go templates and Helm functions the chart uses, and nothing more:
an action it does not know raises `TemplateError` instead of guessing, so a template that strays
outside the subset fails the tests rather than rendering something Helm would not.

Supported: `{{ pipeline }}`, `{{- ... -}}` whitespace trimming, comments, `if / else if / else /
end`, `range $v := X` (with `else`), `$v := X`, `define` / `include`, fields on `.` and `$`,
parentheses, string (both quotes) / number / bool literals, and the functions in `_FUNCS`.
Semantics follow text/template and Helm: missing values are empty, emptiness is falsy, `toYaml`
sorts keys, values are validated against values.schema.json before rendering (as Helm does).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import yaml


class TemplateError(Exception):
    pass


# ---------------------------------------------------------------- lexing


@dataclasses.dataclass
class _Action:
    text: str
    where: str


def _lex(source: str, where: str) -> list[str | _Action]:
    """Text and actions, with `{{-` / `-}}` trimming applied to the neighbouring text."""
    out: list[str | _Action] = []
    pos = 0
    trim_next = False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if start < 0:
            out.append(text)
            return out
        body_start = start + 2
        if source.startswith("- ", body_start) or source.startswith("-\n", body_start):
            text = text.rstrip(" \t\r\n")
            body_start += 1
        out.append(text)
        end, body = _scan_action(source, body_start, where)
        trim_next = body.endswith(" -") or body.endswith("\n-")
        body = body[:-1] if trim_next else body
        body = body.strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(_Action(body, f"{where}:{source.count(chr(10), 0, start) + 1}"))
        pos = end + 2


def _scan_action(source: str, pos: int, where: str) -> tuple[int, str]:
    """The index of the closing `}}` (outside quotes and comments) and the action's text."""
    i = pos
    while i < len(source):
        if source.startswith("/*", i):
            close = source.find("*/", i + 2)
            if close < 0:
                raise TemplateError(f"{where}: unterminated comment")
            i = close + 2
            continue
        char = source[i]
        if char in "\"`":
            i = _skip_string(source, i, where)
            continue
        if source.startswith("}}", i):
            return i, source[pos:i]
        i += 1
    raise TemplateError(f"{where}: unterminated action")


def _skip_string(source: str, i: int, where: str) -> int:
    quote = source[i]
    i += 1
    while i < len(source):
        if quote == '"' and source[i] == "\\":
            i += 2
            continue
        if source[i] == quote:
            return i + 1
        i += 1
    raise TemplateError(f"{where}: unterminated string")


# ---------------------------------------------------------------- parsing

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:\\.|[^"\\])*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<open>\()
    | (?P<close>\))
    | (?P<pipe>\|)
    | (?P<assign>:=)
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


def _tokens(text: str, where: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise TemplateError(f"{where}: cannot parse {text[pos:]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


@dataclasses.dataclass
class _Pipeline:
    commands: list[list[Any]]  # each command: a list of operands (tokens or nested _Pipeline)


def _parse_pipeline(tokens: list[tuple[str, str]], where: str) -> _Pipeline:
    commands: list[list[Any]] = [[]]
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "pipe":
            commands.append([])
        elif kind == "open":
            depth, j = 1, i + 1
            while depth:
                if j >= len(tokens):
                    raise TemplateError(f"{where}: unbalanced parentheses")
                depth += {"open": 1, "close": -1}.get(tokens[j][0], 0)
                j += 1
            commands[-1].append(_parse_pipeline(tokens[i + 1 : j - 1], where))
            i = j
            continue
        elif kind in ("close", "assign"):
            raise TemplateError(f"{where}: unexpected {value!r}")
        else:
            commands[-1].append((kind, value))
        i += 1
    if any(not command for command in commands):
        raise TemplateError(f"{where}: empty command in pipeline")
    return _Pipeline(commands)


@dataclasses.dataclass
class _Node:
    kind: str  # text | output | assign | if | range
    text: str = ""
    var: str = ""
    pipeline: _Pipeline | None = None
    branches: list[tuple[_Pipeline | None, list[_Node]]] = dataclasses.field(default_factory=list)
    body: list[_Node] = dataclasses.field(default_factory=list)
    else_body: list[_Node] = dataclasses.field(default_factory=list)


class _Parser:
    def __init__(self, items: list[str | _Action], defines: dict[str, list[_Node]]) -> None:
        self.items, self.pos, self.defines = items, 0, defines

    def parse(self, closers: tuple[str, ...] = ()) -> tuple[list[_Node], _Action | None]:
        nodes: list[_Node] = []
        while self.pos < len(self.items):
            item = self.items[self.pos]
            self.pos += 1
            if isinstance(item, str):
                if item:
                    nodes.append(_Node("text", text=item))
                continue
            word = item.text.split(None, 1)[0] if item.text else ""
            if word in closers:
                return nodes, item
            nodes.append(self._action(item, word))
        if closers:
            raise TemplateError(f"missing {{{{ end }}}} (expected one of {closers})")
        return nodes, None

    def _action(self, item: _Action, word: str) -> _Node:
        rest = item.text[len(word) :].strip()
        if word == "if":
            return self._if(rest, item.where)
        if word == "range":
            return self._range(rest, item.where)
        if word == "define":
            name = json.loads(rest)
            body, _ = self.parse(("end",))
            self.defines[name] = body
            return _Node("text", text="")
        if word in ("with", "template", "block", "break", "continue"):
            raise TemplateError(f"{item.where}: `{word}` is outside the supported subset")
        tokens = _tokens(item.text, item.where)
        if len(tokens) > 2 and tokens[0][0] == "var" and tokens[1][0] == "assign":
            return _Node("assign", var=tokens[0][1], pipeline=_parse_pipeline(tokens[2:], item.where))
        return _Node("output", pipeline=_parse_pipeline(tokens, item.where))

    def _if(self, condition: str, where: str) -> _Node:
        node = _Node("if")
        current: _Pipeline | None = _parse_pipeline(_tokens(condition, where), where)
        while True:
            body, closer = self.parse(("else", "end"))
            node.branches.append((current, body))
            assert closer is not None
            if closer.text == "end":
                return node
            rest = closer.text[len("else") :].strip()
            if rest.startswith("if "):
                current = _parse_pipeline(_tokens(rest[3:], where), where)
            elif rest:
                raise TemplateError(f"{where}: unsupported else clause {rest!r}")
            else:
                current = None

    def _range(self, spec: str, where: str) -> _Node:
        tokens = _tokens(spec, where)
        var = ""
        if len(tokens) > 2 and tokens[0][0] == "var" and tokens[1][0] == "assign":
            var, tokens = tokens[0][1], tokens[2:]
        node = _Node("range", var=var, pipeline=_parse_pipeline(tokens, where))
        node.body, closer = self.parse(("else", "end"))
        assert closer is not None
        if closer.text == "else":
            node.else_body, _ = self.parse(("end",))
        return node


# ---------------------------------------------------------------- evaluation


def _truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, dict, tuple)):
        return len(value) > 0
    return True


def _go_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, int, float)):
        return str(value)
    raise TemplateError(f"cannot print {type(value).__name__} {value!r}: use toYaml")


def _to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False, width=10_000).rstrip("\n")


def _indent(width: int, text: str) -> str:
    pad = " " * int(width)
    return pad + text.replace("\n", "\n" + pad)


def _printf(fmt: str, *args: Any) -> str:
    if fmt.count("%s") != len(args) or re.search(r"%[^s%]", fmt):
        raise TemplateError(f"printf: only %s is supported ({fmt!r})")
    return fmt % tuple(_go_string(a) for a in args)


def _default(fallback: Any, value: Any = None) -> Any:
    return value if _truthy(value) else fallback


def _trunc(length: int, text: str) -> str:
    return text[: int(length)]


_FUNCS: dict[str, Callable[..., Any]] = {
    "default": _default,
    "trunc": _trunc,
    "trimSuffix": lambda suffix, text: text[: -len(suffix)] if suffix and text.endswith(suffix) else text,
    "contains": lambda needle, haystack: needle in haystack,
    "printf": _printf,
    "quote": lambda value: json.dumps(_go_string(value)),
    "toYaml": _to_yaml,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "indent": _indent,
    "join": lambda sep, items: sep.join(_go_string(i) for i in items),
    "not": lambda value: not _truthy(value),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "lt": lambda a, b: a < b,
    "len": len,
}


class Files:
    """`.Files.Get` over the chart directory, like Helm (a missing file reads as empty)."""

    def __init__(self, root: pathlib.Path) -> None:
        self._root = root

    def Get(self, name: str) -> str:
        path = self._root / name
        return path.read_text() if path.is_file() else ""


class _Engine:
    def __init__(self, defines: dict[str, list[_Node]]) -> None:
        self.defines = defines
        self.funcs = {**_FUNCS, "include": self._include}

    def _include(self, name: str, dot: Any) -> str:
        if name not in self.defines:
            raise TemplateError(f"include: no template named {name!r}")
        return self.render(self.defines[name], dot, {"$": dot})

    def render(self, nodes: list[_Node], dot: Any, variables: dict[str, Any]) -> str:
        out: list[str] = []
        variables = dict(variables)
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "output":
                assert node.pipeline is not None
                out.append(_go_string(self.pipeline(node.pipeline, dot, variables)))
            elif node.kind == "assign":
                assert node.pipeline is not None
                variables[node.var] = self.pipeline(node.pipeline, dot, variables)
            elif node.kind == "if":
                for condition, body in node.branches:
                    if condition is None or _truthy(self.pipeline(condition, dot, variables)):
                        out.append(self.render(body, dot, variables))
                        break
            elif node.kind == "range":
                out.append(self._range(node, dot, variables))
        return "".join(out)

    def _range(self, node: _Node, dot: Any, variables: dict[str, Any]) -> str:
        assert node.pipeline is not None
        items = self.pipeline(node.pipeline, dot, variables)
        if not _truthy(items):
            return self.render(node.else_body, dot, variables)
        if isinstance(items, dict):
            items = [items[k] for k in sorted(items)]
        parts = []
        for item in items:
            scope = {**variables, node.var: item} if node.var else variables
            parts.append(self.render(node.body, item, scope))
        return "".join(parts)

    def pipeline(self, pipeline: _Pipeline, dot: Any, variables: dict[str, Any]) -> Any:
        value: Any = _NOTHING
        for command in pipeline.commands:
            value = self._command(command, dot, variables, value)
        return value

    def _command(self, command: list[Any], dot: Any, variables: dict[str, Any], piped: Any) -> Any:
        head, args = command[0], command[1:]
        extra = [] if piped is _NOTHING else [piped]
        if isinstance(head, tuple) and head[0] == "ident" and head[1] not in ("true", "false", "nil"):
            func = self.funcs.get(head[1])
            if func is None:
                raise TemplateError(f"function {head[1]!r} is outside the supported subset")
            return func(*[self._operand(a, dot, variables) for a in args], *extra)
        if isinstance(head, tuple) and head[0] in ("field", "var") and (args or extra):
            # A method call: `.Files.Get "path"`.
            *owner_path, method = head[1].split(".")
            owner = self._operand((head[0], ".".join(owner_path) or "."), dot, variables)
            func = getattr(owner, method, None)
            if not callable(func):
                raise TemplateError(f"{head[1]} is not a method")
            return func(*[self._operand(a, dot, variables) for a in args], *extra)
        if args or extra:
            raise TemplateError(f"{head!r} is not a function")
        return self._operand(head, dot, variables)

    def _operand(self, operand: Any, dot: Any, variables: dict[str, Any]) -> Any:
        if isinstance(operand, _Pipeline):
            return self.pipeline(operand, dot, variables)
        kind, text = operand
        if kind == "str":
            return json.loads(text)
        if kind == "raw":
            return text[1:-1]
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}[text]
        if kind == "field":
            return _lookup(dot, text.split(".")[1:] if text != "." else [])
        if kind == "var":
            name, *path = text.split(".")
            if name not in variables:
                raise TemplateError(f"undefined variable {name}")
            return _lookup(variables[name], path)
        raise TemplateError(f"unexpected {text!r}")


_NOTHING = object()


def _lookup(value: Any, path: list[str]) -> Any:
    for part in path:
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get(part)
        else:
            value = getattr(value, part)
    return value


# ---------------------------------------------------------------- the chart


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclasses.dataclass
class Rendered:
    files: dict[str, str]  # template path -> rendered text
    objects: list[dict[str, Any]]  # every document of every manifest, in file order

    def find(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def render_chart(
    chart: pathlib.Path,
    overrides: dict[str, Any] | None = None,
    *,
    release: str = "marketplacedb-operator",
    namespace: str = "marketplacedb-system",
) -> Rendered:
    """`helm template RELEASE CHART -n NAMESPACE --set ...`, for the supported subset."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    values = _merge(yaml.safe_load((chart / "values.yaml").read_text()), overrides or {})
    schema = json.loads((chart / "values.schema.json").read_text())
    jsonschema.validate(values, schema)  # Helm refuses values the schema rejects
    dot = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
        "Files": Files(chart),
    }
    defines: dict[str, list[_Node]] = {}
    parsed: dict[str, list[_Node]] = {}
    for path in sorted((chart / "templates").iterdir()):
        if path.suffix in (".yaml", ".tpl", ".txt"):
            rel = str(path.relative_to(chart))
            parsed[rel], _ = _Parser(_lex(path.read_text(), rel), defines).parse()
    engine = _Engine(defines)
    files: dict[str, str] = {}
    objects: list[dict[str, Any]] = []
    for rel, nodes in parsed.items():
        name = pathlib.PurePath(rel).name
        text = engine.render(nodes, dot, {"$": dot})
        files[rel] = text
        if name.startswith("_") or not name.endswith(".yaml"):
            continue
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise TemplateError(f"{rel} renders to invalid YAML: {exc}\n{text}") from None
        objects += [d for d in documents if d is not None]
    return Rendered(files, objects)
