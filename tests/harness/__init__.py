"""Test harness: real servers started by the tests themselves (docs/architecture.md#testing-with-real-parts).

- `harness.postgres`: PostgresServer (a throwaway PostgreSQL 15), FreshDatabase, free_port.
- `harness.pgbouncer`: PgBouncerProcess (the real pgbouncer binary on a given config).
- `harness.kube`: KubeEmulator (KMock with API-server bookkeeping), KubeObjects, kopf_runner
  (which leaves no kopf task behind, even when kopf's stop times out).
- `harness.service_python`: run the project's code as the service OS user from a world-readable
  copy (the checkout may be in a root-only dir, as CI's `mktemp -d` clone is).
- `harness.watchdog`: a pytest plugin bounding every event-loop close and every teardown, so a
  failed test with a task that ignores cancellation ends with its stacks instead of hanging CI.

The pytest fixtures that wrap them live in tests/conftest.py. Nothing here imports the
operator package, so the harness works while the package does not (service_python copies it,
without importing it).
"""
