#!/usr/bin/env bash
# End-to-end on a real cluster (kind): build and load the image, install the operator (Helm chart
# when helm is present, else deploy/install.yaml), start an in-cluster PostgreSQL 15 with the
# reference schema, apply a MarketplaceDB, and assert Ready, a refresh and a query through the pooler.
#
# Needs docker (with a running engine), kind and kubectl. Without them it prints one line saying it
# did not run and why, and exits 0: it never reports a pass it did not earn.
# KEEP_CLUSTER=1 leaves the cluster up; CLUSTER_NAME picks its name.
set -euo pipefail
cd "$(dirname "$0")/.."

not_run() { echo "e2e: NOT RUN: $*"; exit 0; }
command -v docker >/dev/null 2>&1 || not_run "no docker command (a container engine is needed for kind)"
docker info >/dev/null 2>&1 || not_run "docker is installed but its engine does not answer (docker info failed)"
command -v kind >/dev/null 2>&1 || not_run "no kind command (https://kind.sigs.k8s.io/)"
command -v kubectl >/dev/null 2>&1 || not_run "no kubectl command"

cluster=${CLUSTER_NAME:-marketplacedb-e2e}
image=marketplacedb-operator:e2e
ns=e2e
python=${PYTHON:-.venv/bin/python}
step() { echo "e2e: $*"; }
fail() { echo "e2e: FAILED: $*" >&2; kubectl -n marketplacedb-system logs deploy/marketplacedb-operator --tail=100 >&2 || true; kubectl -n "$ns" describe mdb shop >&2 || true; exit 1; }

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  step "creating kind cluster $cluster"
  kind create cluster --name "$cluster" --wait 120s
fi
[ "${KEEP_CLUSTER:-0}" = 1 ] || trap 'kind delete cluster --name "$cluster" >/dev/null 2>&1 || true' EXIT
kubectl config use-context "kind-$cluster" >/dev/null

step "building $image"
docker build -t "$image" .
kind load docker-image "$image" --name "$cluster"

step "installing the operator"
if command -v helm >/dev/null 2>&1; then
  helm upgrade --install marketplacedb-operator charts/marketplacedb-operator \
    --namespace marketplacedb-system --create-namespace \
    --set image.repository=marketplacedb-operator --set image.tag=e2e --set image.pullPolicy=Never --wait --timeout 180s
else
  kubectl apply --server-side -f deploy/install.yaml
  kubectl -n marketplacedb-system set image deployment/marketplacedb-operator operator="$image"
  kubectl -n marketplacedb-system set env deployment/marketplacedb-operator MARKETPLACEDB_OPERATOR_IMAGE="$image"
fi
kubectl -n marketplacedb-system rollout status deployment/marketplacedb-operator --timeout=180s || fail "operator not ready"

step "starting PostgreSQL 15 with the reference schema"
kubectl apply -f tests/e2e/postgres.yaml
kubectl -n "$ns" rollout status deployment/postgres --timeout=180s
psql() { kubectl -n "$ns" exec -i deploy/postgres -- env PGPASSWORD=e2e-only-not-a-secret psql -v ON_ERROR_STOP=1 -U marketplace -d marketplace "$@"; }
"$python" - <<'PY' | psql -q
from marketplacedb_operator import workload
print(workload.schema_sql())
print(workload.data_sql(200))
PY

step "applying the MarketplaceDB"
kubectl apply -f tests/e2e/marketplacedb.yaml
kubectl -n "$ns" wait mdb/shop --for=condition=Ready --timeout=300s || fail "shop never became Ready"

step "running one refresh through its CronJob"
cronjob=$("$python" -c 'from marketplacedb_operator import naming; print(naming.refresh_cronjob_name("shop", "mv_category_counts"))')
kubectl -n "$ns" create job --from="cronjob/$cronjob" e2e-refresh
kubectl -n "$ns" wait job/e2e-refresh --for=condition=complete --timeout=300s || fail "the refresh Job did not complete"
populated=$(psql -Atc "SELECT ispopulated FROM pg_matviews WHERE matviewname = 'mv_category_counts'")
[ "$populated" = t ] || fail "mv_category_counts is not populated after the refresh"

step "querying through the pooler"
pooler=$("$python" -c 'from marketplacedb_operator import naming; print(naming.pooler_name("shop"))')
kubectl -n "$ns" rollout status "deployment/$pooler" --timeout=180s || fail "pooler not available"
rows=$(kubectl -n "$ns" exec -i deploy/postgres -- env PGPASSWORD=e2e-only-not-a-secret \
  psql -h "$pooler" -p 5432 -U marketplace -d marketplace -Atc "SELECT count(*) FROM mv_category_counts")
[ "${rows:-0}" -gt 0 ] || fail "no rows through the pooler"

echo "e2e: PASSED (Ready, refresh, $rows rows through $pooler)"
