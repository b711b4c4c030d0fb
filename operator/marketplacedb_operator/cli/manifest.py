"""`crd` and `validate`: the API itself, with no cluster and no database."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from .. import naming
from ..api.errors import format_errors
from ..api.v1alpha1 import MarketplaceDB
from ..specs.crd import crd_yaml


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, field and problem."""


# Bounds on what a manifest may make the reader do, so a hostile file gets a verdict, not a
# MemoryError or RecursionError: the API server's request limit, a nesting depth far beyond any
# MarketplaceDB (about 10 levels), and a node count after alias expansion (billion laughs).
MAX_BYTES = 3 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000


def _check_depth(text: str) -> None:
    """Nesting depth from the event stream (PyYAML's parser is iterative; its composer is not)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ManifestError(f"nested more than {MAX_DEPTH} levels deep (line {line})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Nodes after alias expansion, counted once per distinct node (memoized, iterative)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_NODES:
                raise ManifestError(f"expands to more than {MAX_NODES} values (YAML aliases): refused")
            continue
        if id(node) in open_nodes:
            raise ManifestError("has a recursive YAML alias: refused")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def read_documents(text: str) -> list[Any]:
    """The YAML documents in `text`, bounded in size, depth and alias expansion; ManifestError otherwise."""
    if len(text.encode(errors="replace")) > MAX_BYTES:
        raise ManifestError(f"is larger than {MAX_BYTES} bytes")
    _check_depth(text)
    loader = yaml.SafeLoader(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node() said there is one
                break
            _check_expansion(node)
            documents.append(loader.construct_document(node))
    finally:
        loader.dispose()
    return [d for d in documents if d is not None]


def _display_name(document: dict[str, Any], number: int) -> str:
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) and re.fullmatch(naming.DNS_LABEL_PATTERN, name) else f"(document {number})"


def register(commands: Any) -> None:
    crd = commands.add_parser("crd", help="print the generated MarketplaceDB CRD (YAML)")
    crd.set_defaults(handler=_crd)
    validate = commands.add_parser("validate", help="check MarketplaceDB manifests; exit 1 naming each bad field")
    validate.add_argument("-f", "--filename", required=True, help="manifest file (YAML, may hold several documents)")
    validate.set_defaults(handler=_validate)


def _crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml())
    return 0


def load_resources(path: str) -> list[MarketplaceDB]:
    """Every MarketplaceDB in a YAML file (other kinds skipped); ManifestError on any problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_BYTES + 1)
        documents = read_documents(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    except ManifestError as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    resources, problems = [], []
    for number, document in enumerate(documents, start=1):
        if not isinstance(document, dict) or document.get("kind") != "MarketplaceDB":
            continue
        name = _display_name(document, number)
        try:
            resources.append(MarketplaceDB.model_validate(document))
        except ValidationError as exc:
            problems += [f"{path}: MarketplaceDB {name}: {line}" for line in format_errors(exc)]
    if problems:
        raise ManifestError("\n".join(problems))
    if not resources:
        raise ManifestError(f"{path}: no MarketplaceDB found")
    return resources


def _validate(args: argparse.Namespace) -> int:
    try:
        resources = load_resources(args.filename)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 1
    for resource in resources:
        print(f"{args.filename}: MarketplaceDB {resource.metadata['name']}: valid")
    return 0
