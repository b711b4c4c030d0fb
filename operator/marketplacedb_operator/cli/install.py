"""`install-manifests`: the plain install manifests (deploy/install.yaml), from the chart's defaults."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import install


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "install-manifests",
        help="print the plain install manifests (Namespace, CRD, RBAC, Deployment, Service) as YAML",
        description="Print what deploy/install.yaml holds: the operator installed cluster-wide with the Helm "
        "chart's default values. `marketplacedb install-manifests > deploy/install.yaml` regenerates it.",
    )
    parser.add_argument(
        "--chart-rbac-rules",
        action="store_true",
        help="print the chart's generated templates/_rbac_rules.tpl instead",
    )
    parser.set_defaults(handler=_install_manifests)


def _install_manifests(args: argparse.Namespace) -> int:
    sys.stdout.write(install.chart_rbac_rules() if args.chart_rbac_rules else install.install_yaml())
    return 0
