#!/usr/bin/env python3
"""Print the reference marketplace's SQL: `python examples/generate.py --products N [--seed S] [--schema]`.

    createdb marketplace
    python examples/generate.py --schema --products 2000000 | psql -q -d marketplace

Works from a checkout without installing the package (it falls back to ../operator).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

try:
    from marketplacedb_operator import workload
except ImportError:  # a plain checkout: use the package next to this folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "operator"))
    from marketplacedb_operator import workload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, required=True, help="products (30%% AI accounts, 70%% seller products)")
    parser.add_argument("--seed", type=int, default=1, help="data seed (default 1): same seed, same rows")
    parser.add_argument("--schema", action="store_true", help="print the CREATE TABLEs first (for a fresh database)")
    args = parser.parse_args(argv)
    try:
        data = workload.data_sql(args.products, args.seed)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.schema:
        sys.stdout.write(workload.schema_sql() + "\n")
    sys.stdout.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
