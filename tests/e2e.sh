#!/usr/bin/env bash
# Kubernetes end-to-end suites, run by tests/all.sh inside
# `.ci/cluster.sh run --` (cluster up, images imported, KUBECONFIG set):
#   1. the cluster smoke test (agent image: Ready, logs, exec, GC),
#   2. the helm wrapper against the cluster,
#   3. the operator e2e (chart, examples, status, rollout, bad input, restart, GC),
#   4. the shares e2e (four tenants on S3, grants, publish/subscribe, edits,
#      revocation, operator killed, bad input).
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
    fi
}
run cluster-smoke tests/cluster/smoke.sh
run helm-wrapper tests/cluster/helm-smoke.sh
run operator tests/operator/e2e.sh
run shares tests/operator/shares-e2e.sh
printf '\nE2E SUMMARY: %d passed, %d failed; passed: %s; failed: %s\n' \
    "${#passed[@]}" "${#failed[@]}" "${passed[*]:-none}" "${failed[*]:-none}"
((${#failed[@]} == 0))
