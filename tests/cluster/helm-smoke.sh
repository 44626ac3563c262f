#!/usr/bin/env bash
# Checks tests/cluster/helm (real helm, or our wrapper over helm-sdkpy) against the cluster:
# lint, install with --set/--set-string/-f/--wait, upgrade --install, status, uninstall.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HELM="$_CARAVAN_LIB_DIR/helm"
CHART="$_CARAVAN_LIB_DIR/testdata/hello-chart"

fresh_namespace NS helm
cm() { kc -n "$NS" get configmap hi-hello -o "jsonpath={.data.$1}"; }
expect() { [[ "$1" == "$2" ]] || { tlog "FAIL: expected '$2', got '$1'"; dump_namespace "$NS"; exit 1; }; }

tlog "helm: $("$HELM" version)"
"$HELM" lint "$CHART" >&2
"$HELM" install hi "$CHART" -n "$NS" --set 'greeting=hey\, you,replicas=3' \
  --set-string image.tag=007 --wait --timeout 2m >&2
expect "$(cm greeting)" "hey, you"
expect "$(cm replicas)" "3"
expect "$(cm image)" "caravan/agent:007"

values=$(mktemp)
trap 'rm -f "$values"; cleanup_namespaces' EXIT
printf 'greeting: from-file\n' >"$values"
"$HELM" upgrade --install hi "$CHART" -n "$NS" -f "$values" --wait >&2
expect "$(cm greeting)" "from-file"
"$HELM" status hi -n "$NS" | grep 'STATUS: deployed' >/dev/null || { tlog "FAIL: status"; exit 1; }

"$HELM" uninstall hi -n "$NS" >&2
wait_for 30 "ConfigMap removed by uninstall" bash -c "! kubectl -n '$NS' get configmap hi-hello"
tlog "PASS"
