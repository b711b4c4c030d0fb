"""Test harness: real servers started by the tests themselves (DESIGN.md section 5).

- `harness.postgres`: PostgresServer (a throwaway PostgreSQL 15), FreshDatabase, free_port.
- `harness.pgbouncer`: PgBouncerProcess (the real pgbouncer binary on a given config).
- `harness.kube`: KubeEmulator (KMock with API-server bookkeeping), KubeObjects, kopf_runner.

The pytest fixtures that wrap them live in tests/conftest.py. Nothing here imports the
operator package, so the harness works while the package does not.
"""
