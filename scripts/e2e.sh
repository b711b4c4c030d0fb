#!/usr/bin/env bash
# End-to-end on a real cluster (kind): build and load the image, install the operator (Helm chart
# when helm is present, else deploy/install.yaml), start an in-cluster PostgreSQL 15 with the
# reference schema, apply a MarketplaceDB, and assert Ready, a refresh that really changed the
# view's rows, and a query through the pooler.
#
# Needs docker (with a running engine), kind, kubectl and python3 (the package's stdlib-only
# modules are read from operator/, no virtualenv). Without them it prints one line saying it did
# not run and why, and exits 0: it never reports a pass it did not earn. It checks that before
# anything else, so `make e2e` says NOT RUN on a machine without a container engine.
#
# CLUSTER_NAME picks the kind cluster (reused when it exists); KEEP_CLUSTER=1 keeps a cluster this
# run created. Only what this run created is removed at exit: the cluster (when it created it),
# else the e2e namespace (when it created it) and its refresh Job. Rerunnable: the schema is loaded
# only into an empty database, the Job name is unique per run.
set -euo pipefail
cd "$(dirname "$0")/.."

not_run() { echo "e2e: NOT RUN: $*"; exit 0; }
command -v docker >/dev/null 2>&1 || not_run "no docker command (a container engine is needed for kind)"
docker info >/dev/null 2>&1 || not_run "docker is installed but its engine does not answer (docker info failed)"
command -v kind >/dev/null 2>&1 || not_run "no kind command (https://kind.sigs.k8s.io/)"
command -v kubectl >/dev/null 2>&1 || not_run "no kubectl command"
command -v python3 >/dev/null 2>&1 || not_run "no python3 command"

cluster=${CLUSTER_NAME:-marketplacedb-e2e}
image=marketplacedb-operator:e2e
ns=e2e
job=e2e-refresh-$(date +%s)
py() { PYTHONPATH=operator python3 "$@"; }
step() { echo "e2e: $*"; }
fail() {
  echo "e2e: FAILED: $*" >&2
  kubectl -n marketplacedb-system logs deploy/marketplacedb-operator --tail=100 >&2 || true
  kubectl -n "$ns" describe mdb shop >&2 || true
  exit 1
}

created_cluster=0
created_ns=0
cleanup() {
  if [ "$created_cluster" = 1 ]; then
    [ "${KEEP_CLUSTER:-0}" = 1 ] || kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    return
  fi
  kubectl -n "$ns" delete job "$job" --ignore-not-found >/dev/null 2>&1 || true
  [ "$created_ns" = 0 ] || kubectl delete namespace "$ns" --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  step "creating kind cluster $cluster"
  created_cluster=1
  kind create cluster --name "$cluster" --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null
kubectl get namespace "$ns" >/dev/null 2>&1 || created_ns=1

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
  kubectl -n marketplacedb-system set env deployment/marketplacedb-operator \
    MARKETPLACEDB_OPERATOR_IMAGE="$image" MARKETPLACEDB_IMAGE_PULL_POLICY=Never
fi
kubectl -n marketplacedb-system rollout status deployment/marketplacedb-operator --timeout=180s || fail "operator not ready"

step "starting PostgreSQL 15 with the reference schema"
kubectl apply -f tests/e2e/postgres.yaml
kubectl -n "$ns" rollout status deployment/postgres --timeout=180s
# Over TCP: the image's first-start init server listens on the Unix socket only, so a socket
# check can succeed before the real server runs.
psql() { kubectl -n "$ns" exec -i deploy/postgres -- env PGPASSWORD=e2e-only-not-a-secret psql -h 127.0.0.1 -v ON_ERROR_STOP=1 -U marketplace -d marketplace "$@"; }
for _ in $(seq 60); do psql -Atc 'SELECT 1' >/dev/null 2>&1 && break; sleep 2; done
psql -Atc 'SELECT 1' >/dev/null || fail "PostgreSQL does not accept TCP connections"
if [ "$(psql -Atc "SELECT to_regclass('public.seller_products') IS NULL")" = t ]; then
  py - <<'PY' | psql -q
from marketplacedb_operator import workload
print(workload.schema_sql())
print(workload.data_sql(200))
PY
else
  step "reference schema already loaded (rerun): kept"
fi

step "applying the MarketplaceDB"
kubectl apply -f tests/e2e/marketplacedb.yaml
kubectl -n "$ns" wait mdb/shop --for=condition=Ready --timeout=300s || fail "shop never became Ready"

step "running one refresh through its CronJob, after a write the view must show"
# The operator creates views WITH DATA, so "populated" proves nothing: count the rows the view
# reports, change the base table, and require the refresh to report exactly that change.
counted="SELECT coalesce(sum(product_count), 0) FROM mv_category_counts"
before=$(psql -Atc "$counted")
psql -q -c "UPDATE seller_products SET is_available = true, is_approved = true WHERE id IN (
  SELECT id FROM seller_products WHERE category_id IS NOT NULL AND NOT (is_available AND is_approved)
  ORDER BY id LIMIT 5)"
changed=$(( $(psql -Atc "SELECT count(*) FROM seller_products WHERE category_id IS NOT NULL AND is_available AND is_approved") - before ))
[ "$changed" -gt 0 ] || fail "the write changed nothing the view counts (before: $before)"
cronjob=$(py -c 'from marketplacedb_operator import naming; print(naming.refresh_cronjob_name("shop", "mv_category_counts"))')
kubectl -n "$ns" create job --from="cronjob/$cronjob" "$job"
kubectl -n "$ns" wait "job/$job" --for=condition=complete --timeout=300s || fail "the refresh Job did not complete"
outcome=$(kubectl -n "$ns" logs "job/$job" | py -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["outcome"])')
case "$outcome" in
  refreshed|refreshed-plain) ;;
  *) fail "the refresh Job exited 0 with outcome $outcome, not a refresh" ;;
esac
after=$(psql -Atc "$counted")
[ "$after" -eq $(( before + changed )) ] || fail "view shows $after products after the refresh, expected $before + $changed"

step "querying through the pooler"
pooler=$(py -c 'from marketplacedb_operator import naming; print(naming.pooler_name("shop"))')
kubectl -n "$ns" rollout status "deployment/$pooler" --timeout=180s || fail "pooler not available"
rows=$(kubectl -n "$ns" exec -i deploy/postgres -- env PGPASSWORD=e2e-only-not-a-secret \
  psql -h "$pooler" -p 5432 -U marketplace -d marketplace -Atc "SELECT count(*) FROM mv_category_counts")
[ "${rows:-0}" -gt 0 ] || fail "no rows through the pooler"

echo "e2e: PASSED (Ready; refresh $outcome: $before -> $after products; $rows rows through $pooler)"
