"""Benchmarks of marketplacedb-operator: `python -m bench.run --quick|--full` (see bench/run.py).

Every scenario starts its own servers (PostgreSQL 15 and pgbouncer from the test harness in
tests/harness/, the KMock API emulator for the operator) on loopback, loads the reference
workload and measures side by side, three runs each; bench/REPORT.md is written from the run.
"""
