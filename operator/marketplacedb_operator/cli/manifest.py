"""`crd` and `validate`: the API itself, with no cluster and no database."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from ..api.errors import format_errors
from ..api.v1alpha1 import MarketplaceDB
from ..specs.crd import crd_yaml


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, field and problem."""


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
            documents = [d for d in yaml.safe_load_all(handle) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    resources, problems = [], []
    for number, document in enumerate(documents, start=1):
        if not isinstance(document, dict) or document.get("kind") != "MarketplaceDB":
            continue
        name = (document.get("metadata") or {}).get("name", f"document {number}")
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
        print(f"{args.filename}: MarketplaceDB {resource.metadata.get('name', '?')}: valid")
    return 0
