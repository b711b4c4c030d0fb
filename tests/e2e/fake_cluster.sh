#!/usr/bin/env bash
# A stand-in for docker, kind, helm and kubectl (one script, dispatched on its name), so the tests
# can drive scripts/e2e.sh on a machine without a cluster and check what it decides. Every call is
# appended to $FAKE_LOG. PostgreSQL is real: `kubectl exec deploy/postgres -- ... psql ...` runs the
# local psql against $FAKE_DSN_* (a database of the test session's throwaway server); waiting for
# the MarketplaceDB to be Ready applies it with the real `marketplacedb apply`; a refresh Job runs
# the real `marketplacedb refresh` unless FAKE_JOB says otherwise:
#   FAKE_JOB=honest (default) | busy (the job prints skipped-busy) | lying (prints refreshed, does nothing)
# FAKE_CLUSTERS: kind clusters that exist; FAKE_NS_EXISTS=1: namespace e2e exists already.
set -euo pipefail
tool=$(basename "$0")
echo "$tool $*" >> "$FAKE_LOG"
state=${FAKE_STATE:?}
case "$tool" in
  docker|helm) exit 0 ;;
  kind)
    [ "${1:-}" = get ] && printf '%s\n' ${FAKE_CLUSTERS:-}
    exit 0 ;;
esac
# kubectl
args=("$@")
[ "${args[0]}" = -n ] && args=("${args[@]:2}")
case "${args[0]} ${args[1]:-}" in
  "get namespace") [ "${FAKE_NS_EXISTS:-0}" = 1 ]; exit ;;
  "wait mdb/shop")
    "$FAKE_MARKETPLACEDB" apply -f tests/e2e/marketplacedb.yaml --dsn "$FAKE_DSN" >> "$FAKE_LOG" 2>&1; exit ;;
  "create job")
    job=${args[3]}
    case "${FAKE_JOB:-honest}" in
      honest) "$FAKE_MARKETPLACEDB" refresh --view mv_category_counts --no-skip-if-unchanged -o json \
                --dsn "$FAKE_DSN" > "$state/$job.log" ;;
      busy) echo '{"outcome": "skipped-busy", "reason": "another refresh holds the lock"}' > "$state/$job.log" ;;
      lying) echo '{"outcome": "refreshed", "reason": "stale"}' > "$state/$job.log" ;;
    esac
    exit 0 ;;
  "logs job/"*) cat "$state/${args[1]#job/}.log"; exit ;;
  "exec -i")
    # exec -i deploy/postgres -- env PGPASSWORD=... psql [-h H] [-p P] [-v ...] -U U -d D ARGS...
    rest=("${args[@]:4}"); out=()
    i=0
    while [ $i -lt ${#rest[@]} ]; do
      case "${rest[$i]}" in
        env|PGPASSWORD=*) ;;
        -h|-p|-U|-d) i=$((i + 1)) ;;
        *) out+=("${rest[$i]}") ;;
      esac
      i=$((i + 1))
    done
    exec "${out[0]}" "$FAKE_DSN" "${out[@]:1}" ;;
esac
exit 0
