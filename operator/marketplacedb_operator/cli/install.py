"""`install-manifests`: the plain install manifests (deploy/install.yaml), from the chart's defaults."""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

from .. import install
from ..settings import PULL_POLICIES, Settings


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "install-manifests",
        help="print the plain install manifests (Namespace, CRD, RBAC, Deployment, Service) as YAML",
        description="Print what deploy/install.yaml holds: the operator installed cluster-wide with the Helm "
        "chart's default values. `marketplacedb install-manifests > deploy/install.yaml` regenerates it; with "
        "--image (and --image-pull-secret) the same objects run your own image: "
        "`marketplacedb install-manifests --image REGISTRY/REPO:TAG | kubectl apply --server-side -f -`.",
    )
    parser.add_argument(
        "--chart-rbac-rules",
        action="store_true",
        help="print the chart's generated templates/_rbac_rules.tpl instead",
    )
    parser.add_argument("--image", metavar="REPOSITORY:TAG",
                        help="the operator image (also run by the refresh CronJobs and the pooler agent)")
    parser.add_argument("--image-pull-policy", choices=PULL_POLICIES, help="for the operator and every pod it creates")
    parser.add_argument("--image-pull-secret", action="append", default=[], metavar="NAME",
                        help="pull Secret for the operator and every pod it creates (repeatable); it must exist "
                        "in marketplacedb-system and in each application namespace")
    parser.set_defaults(handler=_install_manifests)


def _values(args: argparse.Namespace) -> dict[str, Any] | None:
    if not (args.image or args.image_pull_policy or args.image_pull_secret):
        return None
    values = copy.deepcopy(install.DEFAULT_VALUES)
    if args.image:
        repository, colon, tag = args.image.rpartition(":")
        if not colon or "/" in tag:  # `host:5000/repo` has no tag: the colon belongs to the registry
            raise ValueError(f"--image {args.image!r}: give REPOSITORY:TAG")
        values["image"].update(repository=repository, tag=tag)
    if args.image_pull_policy:
        values["image"]["pullPolicy"] = args.image_pull_policy
    Settings.checked(image_pull_secrets=tuple(args.image_pull_secret))  # the operator's own check, now, not at start-up
    values["imagePullSecrets"] = [{"name": name} for name in args.image_pull_secret]
    return values


def _install_manifests(args: argparse.Namespace) -> int:
    if args.chart_rbac_rules:
        sys.stdout.write(install.chart_rbac_rules())
        return 0
    try:
        values = _values(args)
    except ValueError as exc:
        print(f"marketplacedb install-manifests: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(install.install_yaml(values))
    return 0
