#!/usr/bin/env bash
# Shares benchmark on the real cluster (prints figures; not a timed test):
# 20 Agents on S3 (moto on the node address), 50 publish Shares of 4 MiB
# each (agents 0–9, five folders each, each for one explicit recipient among
# agents 10–19) and the 50 matching subscribe Shares (tickets from the
# publish Shares' status). Reports seconds from apply to all Ready,
# operator reconciles/s, operator and agent RSS.
#
# Needs the cluster, the images and the chart installable (like the e2e).
# Env: KUBECONFIG, HELM, CARAVAN_BENCH_AGENTS (20), CARAVAN_BENCH_SHARES (50),
# CARAVAN_BENCH_MIB (4), CARAVAN_SHARES_MOTO_PORT (9482), CARAVAN_KEEP=1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${KUBECONFIG:=$ROOT/target/cluster/kubeconfig}"
export KUBECONFIG
NS=caravan-bench
SYS_NS=caravan-system
AGENTS="${CARAVAN_BENCH_AGENTS:-20}"
SHARES="${CARAVAN_BENCH_SHARES:-50}"
MIB="${CARAVAN_BENCH_MIB:-4}"
NODE_IP="${CARAVAN_NODE_IP:-10.231.0.1}"
MOTO_PORT="${CARAVAN_SHARES_MOTO_PORT:-9482}"
S3="http://$NODE_IP:$MOTO_PORT"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/caravan/venv-moto"
CARAVAN_LOG_TAG=shares-bench
# shellcheck source=tests/cluster/lib.sh
source "$ROOT/tests/cluster/lib.sh"
if [[ ! -f "$KUBECONFIG" ]] || ! kc version >/dev/null 2>&1; then
  echo "SKIP: shares bench: no reachable cluster"
  exit 0
fi
: "${HELM:=$ROOT/tests/cluster/helm}"
HALF=$((AGENTS / 2))

MOTO_PID=""
cleanup() {
  [[ "${CARAVAN_KEEP:-0}" == 1 ]] && return
  kc -n "$NS" delete shares --all --wait=false >/dev/null 2>&1 || true
  kc delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
  "$HELM" uninstall caravan -n "$SYS_NS" >/dev/null 2>&1 || true
  [[ -n "$MOTO_PID" ]] && kill "$MOTO_PID" 2>/dev/null
}
trap cleanup EXIT

bash "$ROOT/tests/s3/moto.sh" start "$MOTO_PORT" >/dev/null && bash "$ROOT/tests/s3/moto.sh" stop "$MOTO_PORT" >/dev/null
"$VENV/bin/moto_server" -H "$NODE_IP" -p "$MOTO_PORT" >"$ROOT/target/bench-moto.log" 2>&1 &
MOTO_PID=$!
wait_for 30 "moto" curl -fsS -o /dev/null "$S3/" || exit 1
"$VENV/bin/python" - "$S3" "$AGENTS" "$SHARES" "$HALF" "$MIB" <<'PY'
import hashlib, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
agents, shares, half, mib = map(int, sys.argv[2:])
for i in range(agents):
    s3.create_bucket(Bucket=f"agent-{i}")
for j in range(shares):
    body = hashlib.shake_256(f"share-{j}".encode()).digest(mib << 20)
    s3.put_object(Bucket=f"agent-{j % half}", Key=f"share-{j}/data.bin", Body=body)
PY

kc create namespace "$SYS_NS" >/dev/null 2>&1 || true
kc apply --validate=false -f "$ROOT/charts/caravan/crds/" >/dev/null
"$HELM" upgrade --install caravan "$ROOT/charts/caravan" -n "$SYS_NS" \
  -f "$ROOT/examples/provider/values.yaml" --set repository.enabled=true \
  --set operator.replicas=1 >/dev/null
kc -n "$SYS_NS" wait deployment/caravan-operator --for=condition=Available --timeout=180s >/dev/null
kc -n "$SYS_NS" wait deployment/caravan-repository --for=condition=Available --timeout=180s >/dev/null
REPO="http://$(kc -n "$SYS_NS" get service caravan-repository -o jsonpath='{.spec.clusterIP}'):7500"
kc create namespace "$NS" >/dev/null 2>&1 || true

{
  for ((i = 0; i < AGENTS; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Secret
metadata: {name: agent-$i-s3, namespace: $NS}
stringData: {access_key_id: k, secret_access_key: s}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: agent-$i, namespace: $NS}
spec:
  storage:
    scheme: s3
    options: {bucket: agent-$i, region: us-east-1, endpoint: "$S3"}
    secretRef: {name: agent-$i-s3}
  repositories: ["$REPO"]
  resources:
    requests: {cpu: 5m, memory: 24Mi}
    limits: {cpu: 500m, memory: 192Mi}
EOF
  done
} | kc apply -f - >/dev/null
t_agents=$SECONDS
wait_for 600 "agents Ready" bash -c "[[ \$(kubectl -n $NS get agents -o jsonpath='{range .items[*]}{.status.phase}{\"\\n\"}{end}' | grep -c '^Ready$') == $AGENTS ]]" || exit 1
tlog "$AGENTS agents Ready in $((SECONDS - t_agents)) s"
declare -a ID
for ((i = 0; i < AGENTS; i++)); do
  ID[i]=$(kc -n "$NS" get agent "agent-$i" -o jsonpath='{.status.agentId}')
done

metric() { kc get --raw "/api/v1/namespaces/$SYS_NS/pods/$(kc -n "$SYS_NS" get pods -l app.kubernetes.io/name=caravan-operator -o jsonpath='{.items[0].metadata.name}'):8080/proxy/metrics" 2>/dev/null |
  awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}'; }
r0=$(metric 'caravan_operator_reconciles_total{controller="share"')
t0=$SECONDS
{
  for ((j = 0; j < SHARES; j++)); do
    p=$((j % HALF)); r=$((HALF + j % (AGENTS - HALF)))
    cat <<EOF
---
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: pub-$j, namespace: $NS}
spec:
  agent: agent-$p
  publish: {path: share-$j, recipients: {agentIds: ["${ID[r]}"]}, rescanInterval: 5m}
EOF
  done
} | kc apply -f - >/dev/null
wait_for 600 "publish Shares Ready" bash -c "[[ \$(kubectl -n $NS get shares -o jsonpath='{range .items[*]}{.status.phase}{\"\\n\"}{end}' | grep -c '^Ready$') -ge $SHARES ]]" || exit 1
t_pub=$((SECONDS - t0))
{
  for ((j = 0; j < SHARES; j++)); do
    r=$((HALF + j % (AGENTS - HALF)))
    ticket=$(kc -n "$NS" get share "pub-$j" -o jsonpath='{.status.tickets[0].ticket}')
    cat <<EOF
---
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: sub-$j, namespace: $NS}
spec:
  agent: agent-$r
  subscribe: {ticket: "$ticket", destination: "from/share-$j", pollInterval: 30s}
EOF
  done
} | kc apply -f - >/dev/null
wait_for 900 "all Shares Ready" bash -c "[[ \$(kubectl -n $NS get shares -o jsonpath='{range .items[*]}{.status.phase}{\"\\n\"}{end}' | grep -c '^Ready$') -ge $((2 * SHARES)) ]]" || exit 1
t_all=$((SECONDS - t0))
r1=$(metric 'caravan_operator_reconciles_total{controller="share"')
rss() { ps -C "$1" -o rss= 2>/dev/null | awk '{s+=$1; if ($1>m) m=$1; n++} END {printf "%d processes, max %.1f MiB, total %.1f MiB", n, m/1024, s/1024}'; }
echo "SHARES BENCH: $AGENTS agents, $SHARES publish + $SHARES subscribe Shares of $MIB MiB"
echo "  publish Shares Ready: $t_pub s after apply"
echo "  all $((2 * SHARES)) Shares Ready: $t_all s after the first apply"
echo "  share reconciles: $((r1 - r0)) ($(awk -v n=$((r1 - r0)) -v t=$t_all 'BEGIN {printf "%.1f", n / (t > 0 ? t : 1)}')/s)"
echo "  operator RSS: $(rss caravan-operator)"
echo "  agent RSS: $(rss caravan-agent)"
