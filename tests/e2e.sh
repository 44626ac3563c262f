#!/usr/bin/env bash
# Kubernetes end-to-end suites, run by tests/all.sh inside
# `.ci/cluster.sh run --` (cluster up, images imported, KUBECONFIG set):
#   1. the cluster smoke test (agent image: Ready, logs, exec, GC),
#   2. the helm wrapper against the cluster,
#   3. the operator e2e (chart, examples, status, rollout, bad input, restart, GC),
#   4. the shares e2e (four tenants on S3, grants, publish/subscribe, edits,
#      revocation, operator killed, bad input).
#   5. an operator upgrade restarts no agent (pod-template hashes stay),
#   6. the chart's repository on S3 keeps every record across a restart,
#   7. scale to zero: an idle Agent sleeps (0 pods), a Share change or a
#      subscriber wakes it, it publishes, and sleeps again.
# With CARAVAN_SCRAPE_OUT=FILE, every Caravan /metrics endpoint is scraped every
# 5 s meanwhile (tests/monitoring/scrape.py), for the dashboard rendering.
# Prints "E2E SUMMARY: …" last; exits non-zero when any suite failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
passed=()
failed=()
run() { # NAME SCRIPT
    local name=$1 script=$2 t0=$SECONDS
    printf '\n[e2e] ===== %s =====\n' "$name" >&2
    if bash "$script" </dev/null; then
        passed+=("$name ($((SECONDS - t0))s)")
    else
        failed+=("$name")
        diagnose "$name"
    fi
}
# After a failed suite: what the node and the pods say, in a few bounded
# lines, so a failure in CI (whose daemon logs stay on its machine) shows
# whether the cluster itself was unwell (disk or memory pressure, pods not
# scheduled or not pulling) or the suite's own subject failed.
diagnose() { # SUITE
    {
        printf '[e2e] --- cluster state after %s failed ---\n' "$1"
        df -Ph "$ROOT" /tmp "${CARAVAN_CLUSTER_STATE:-/var/lib/caravan-cluster}" 2>/dev/null | awk '!seen[$0]++'
        kubectl get nodes -o 'jsonpath={range .items[*]}{.metadata.name}:{range .status.conditions[*]} {.type}={.status}{end}{"\n"}{end}' 2>&1
        kubectl describe nodes 2>/dev/null | grep -A3 -i '^Taints' | head -4
        echo "pods not Running or not Ready:"
        kubectl get pods -A --no-headers 2>&1 | awk '$4 != "Running" || split($3, r, "/") && r[1] != r[2]' | head -20
        echo "last Warning events:"
        kubectl get events -A --field-selector type=Warning --sort-by=.lastTimestamp 2>&1 | tail -15 | cut -c1-300
    } >&2
}
if [[ -n "${CARAVAN_SCRAPE_OUT:-}" ]]; then
    stop_file=$(mktemp -u /tmp/caravan-scrape-stop.XXXXXX)
    export CARAVAN_SCRAPE_EXTRA="${CARAVAN_SCRAPE_OUT}.extra"
    : >"$CARAVAN_SCRAPE_EXTRA"
    python3 tests/monitoring/scrape.py "$CARAVAN_SCRAPE_OUT" "$stop_file" 5 3600 &
    scraper=$!
    trap 'touch "$stop_file"; wait "$scraper" 2>/dev/null; rm -f "$stop_file"' EXIT
fi
run cluster-smoke tests/cluster/smoke.sh
run helm-wrapper tests/cluster/helm-smoke.sh
run operator tests/operator/e2e.sh
run shares tests/operator/shares-e2e.sh
run operator-upgrade tests/operator/upgrade.sh
run repository-s3 tests/chart/repository-s3.sh
# With offline seeding: the sleeping publisher's bucket serves a new
# subscriber without waking her (issue 13's cluster case).
export CARAVAN_STZ_OFFLINE="${CARAVAN_STZ_OFFLINE:-1}"
run scale-to-zero tests/operator/scale-to-zero.sh
printf '\nE2E SUMMARY: %d passed, %d failed; passed: %s; failed: %s\n' \
    "${#passed[@]}" "${#failed[@]}" "${passed[*]:-none}" "${failed[*]:-none}"
((${#failed[@]} == 0))
