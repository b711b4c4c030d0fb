"""The `marketplacedb` command: one subcommand per module, each registering itself."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..settings import SettingsError
from . import demo, doctor, manifest, pooler, render, run
from . import install as install_cli
from . import refresh as refresh_cli
from . import schema as schema_cli

# Each module registers its subcommands on the parser: (name, module.register).
_MODULES = [demo, manifest, schema_cli, refresh_cli, render, run, pooler, install_cli, doctor]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marketplacedb",
        description="Operate a marketplace's PostgreSQL from Kubernetes: concurrent indexes, materialized "
        "views with safe refreshes, a sized PgBouncer pooler and health probes, declared by MarketplaceDB "
        "resources.",
        epilog="Run `marketplacedb COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except SettingsError as exc:  # a bad MARKETPLACEDB_* variable, whichever command read it: one line
        print(f"marketplacedb: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
