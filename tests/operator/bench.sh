#!/usr/bin/env bash
# Operator benchmark on a bare local API server: etcd + kube-apiserver 1.20.2
# only (no controller-manager, scheduler or kubelet, so no pod is ever made:
# the kubelet is scaled out of it). Applies N Agents (default 1,000) spread
# over M namespaces (default 50), each with its namespace's storage Secret,
# and measures:
#   - time from the first Agent applied until every Agent has its Deployment
#     and a status with an agent id,
#   - reconciles per second (from the operator's /metrics),
#   - the operator's peak RSS (VmHWM).
# Uses the binaries cached by tests/cluster/build-kubernetes.sh and the
# release operator (target/release/caravan-operator, built if missing).
# Everything listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AGENTS="${BENCH_AGENTS:-1000}"
NAMESPACES="${BENCH_NAMESPACES:-50}"
CONCURRENCY="${BENCH_CONCURRENCY:-16}"
K8S_BIN="${CARAVAN_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/caravan/kubernetes/1.20.2/bin}"
OPERATOR="${CARAVAN_OPERATOR_BIN:-$ROOT/target/release/caravan-operator}"
ETCD_PORT="${BENCH_ETCD_PORT:-23990}"
API_PORT="${BENCH_API_PORT:-16443}"
HTTP_PORT="${BENCH_HTTP_PORT:-18080}"
WORK=$(mktemp -d /tmp/caravan-bench.XXXXXX)
PIDS=()

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
stop() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [[ "${BENCH_KEEP:-0}" == 1 ]] || rm -rf "$WORK"
}
trap stop EXIT

if [[ ! -x "$K8S_BIN/kube-apiserver" ]] || ! command -v etcd >/dev/null; then
  echo "SKIP: operator bench: no kube-apiserver in $K8S_BIN or no etcd (run tests/cluster/up.sh once)"
  exit 0
fi
if [[ ! -x "$OPERATOR" ]]; then
  (cd "$ROOT" && cargo build --release -p caravan-operator)
fi

log "etcd and kube-apiserver in $WORK"
mkdir -p "$WORK/pki"
openssl genrsa -out "$WORK/pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$WORK/pki/sa.key" -pubout -out "$WORK/pki/sa.pub" 2>/dev/null
TOKEN="bench-$(openssl rand -hex 12)"
echo "$TOKEN,bench-admin,bench-admin,\"system:masters\"" >"$WORK/pki/tokens.csv"
etcd --name bench --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "bench=http://127.0.0.1:$((ETCD_PORT + 1))" \
  --quota-backend-bytes 2147483648 >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
"$K8S_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
  --cert-dir "$WORK/pki/apiserver" --token-auth-file "$WORK/pki/tokens.csv" \
  --authorization-mode RBAC --service-account-key-file "$WORK/pki/sa.pub" \
  --service-account-signing-key-file "$WORK/pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range 10.234.0.0/16 --profiling=false >"$WORK/apiserver.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}
users:
- name: bench
  user: {token: "$TOKEN"}
contexts:
- name: bench
  context: {cluster: bench, user: bench}
current-context: bench
KCFG
export KUBECONFIG="$WORK/kubeconfig"
for _ in $(seq 120); do kubectl get --raw /readyz >/dev/null 2>&1 && break; sleep 1; done
kubectl get --raw /readyz >/dev/null
kubectl apply --server-side -f "$ROOT/crds/" >/dev/null
kubectl wait --for condition=established --timeout=60s crd/agents.caravan.dev >/dev/null

log "$NAMESPACES namespaces with a storage Secret each"
for ((n = 0; n < NAMESPACES; n++)); do
  printf -- '---\napiVersion: v1\nkind: Namespace\nmetadata: {name: bench-%02d}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: storage, namespace: bench-%02d}\nstringData: {atomic_write_dir: /data/.tmp}\n' "$n" "$n"
done >"$WORK/namespaces.yaml"
kubectl apply -f "$WORK/namespaces.yaml" >/dev/null
for ((i = 0; i < AGENTS; i++)); do
  printf -- '---\napiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: a%04d, namespace: bench-%02d}\nspec:\n  storage: {scheme: fs, secretRef: {name: storage}}\n' "$i" "$((i % NAMESPACES))"
done >"$WORK/agents.yaml"

log "operator (concurrency $CONCURRENCY): $OPERATOR"
RUST_LOG=warn "$OPERATOR" run --namespace default --pod-name bench --concurrency "$CONCURRENCY" \
  --http-addr "127.0.0.1:$HTTP_PORT" >"$WORK/operator.log" 2>&1 &
OP_PID=$!
PIDS+=($OP_PID)
for _ in $(seq 60); do curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
sleep 3 # leader election + initial (empty) list
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$OP_PID/status")

log "applying $AGENTS Agents"
T0=$(date +%s.%N)
kubectl apply -f "$WORK/agents.yaml" >/dev/null
T_APPLIED=$(date +%s.%N)
done_count() {
  local deps ids
  deps=$(kubectl get deployments -A -l app.kubernetes.io/managed-by=caravan-operator --no-headers 2>/dev/null | wc -l)
  ids=$(kubectl get agents -A -o jsonpath='{range .items[*]}{.status.agentId}{"\n"}{end}' 2>/dev/null | grep -c '^cv1-' || true)
  echo "$deps $ids"
}
while true; do
  read -r deps ids < <(done_count)
  if ((deps >= AGENTS && ids >= AGENTS)); then break; fi
  if (($(date +%s) - ${T0%.*} > 900)); then log "gave up after 900 s: $deps deployments, $ids ids"; exit 1; fi
  sleep 1
done
T1=$(date +%s.%N)
metrics=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics")
reconciles=$(awk '/^caravan_operator_reconciles_total/ {s+=$2} END {print s+0}' <<<"$metrics")
errors=$(awk '/^caravan_operator_reconcile_errors_total/ {s+=$2} END {print s+0}' <<<"$metrics")
patches=$(awk '/^caravan_operator_status_patches_total/ {s+=$2} END {print s+0}' <<<"$metrics")
rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$OP_PID/status")
secrets=$(kubectl get secrets -A -l app.kubernetes.io/managed-by=caravan-operator --no-headers | wc -l)
elapsed=$(echo "$T1 - $T0" | bc -l)
apply_s=$(echo "$T_APPLIED - $T0" | bc -l)
printf '\nCaravan operator benchmark (kube-apiserver 1.20.2, no kubelet, %s cores)\n' "$(nproc)"
printf '  agents / namespaces            %d / %d (concurrency %d)\n' "$AGENTS" "$NAMESPACES" "$CONCURRENCY"
printf '  kubectl apply of the Agents    %.1f s\n' "$apply_s"
printf '  apply start → all Deployments + status with agent id   %.1f s\n' "$elapsed"
printf '  reconciles                     %d (%.1f per second)\n' "$reconciles" "$(echo "$reconciles / $elapsed" | bc -l)"
printf '  status patches / errors        %d / %d\n' "$patches" "$errors"
printf '  identity Secrets               %d\n' "$secrets"
printf '  operator RSS idle / peak       %.1f MiB / %.1f MiB\n' "$(echo "$rss_idle / 1024" | bc -l)" "$(echo "$rss_peak / 1024" | bc -l)"
((secrets == AGENTS)) || { echo "expected $AGENTS identity Secrets, found $secrets"; exit 1; }
echo "1 passed, 0 failed"
