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
kubectl apply --validate=false -f "$ROOT/crds/" >/dev/null
kubectl wait --for condition=established --timeout=60s crd/agents.caravan.dev >/dev/null

log "$NAMESPACES namespaces with a storage Secret each"
for ((n = 0; n < NAMESPACES; n++)); do
  printf -- '---\napiVersion: v1\nkind: Namespace\nmetadata: {name: bench-%02d}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: storage, namespace: bench-%02d}\nstringData: {atomic_write_dir: /data/.tmp}\n' "$n" "$n"
done >"$WORK/namespaces.yaml"
kubectl apply -f "$WORK/namespaces.yaml" >/dev/null

start_operator() { # LOGFILE — starts the operator, sets OP_PID
  RUST_LOG=warn "$OPERATOR" run --namespace default --pod-name "bench-$RANDOM" --concurrency "$CONCURRENCY" \
    --http-addr "127.0.0.1:$HTTP_PORT" >"$1" 2>&1 &
  OP_PID=$!
  PIDS=("$OP_PID" "${PIDS[@]}") # stopped first at exit
  for _ in $(seq 60); do curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
}
count() { # → "DEPLOYMENTS IDS"
  local deps ids
  deps=$(kubectl get deployments -A -l app.kubernetes.io/managed-by=caravan-operator --no-headers 2>/dev/null | wc -l)
  ids=$(kubectl get agents -A -o jsonpath='{range .items[*]}{.status.agentId}{"\n"}{end}' 2>/dev/null | grep -c '^cv1-' || true)
  echo "$deps $ids"
}
wait_all() { # N T0 — until N Deployments and N agent ids
  local deps ids
  while true; do
    read -r deps ids < <(count)
    if ((deps >= $1 && ids >= $1)); then return 0; fi
    if (($(date +%s) - ${2%.*} > 900)); then log "gave up after 900 s: $deps deployments, $ids ids"; exit 1; fi
    sleep 1
  done
}
metric() { awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}' <<<"$2"; }
mib() { echo "$1 / 1024" | bc -l; }
split_agents() { # PREFIX DIR — one file per namespace, for parallel applies
  local n i
  mkdir -p "$2"
  for ((i = 0; i < AGENTS; i++)); do
    n=$((i % NAMESPACES))
    printf -- '---\napiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: %s%04d, namespace: bench-%02d}\nspec:\n  storage: {scheme: fs, secretRef: {name: storage}}\n' "$1" "$i" "$n" >>"$2/ns-$n.yaml"
  done
}
apply_parallel() { find "$1" -name '*.yaml' -print0 | xargs -0 -P 8 -I{} kubectl apply -f {} >/dev/null; }

# ---- A: the operator is running; N Agents are applied (8 kubectl in parallel).
log "A: operator (concurrency $CONCURRENCY) running; applying $AGENTS Agents"
split_agents a "$WORK/a"
start_operator "$WORK/operator-a.log"
sleep 3 # leader election + initial (empty) list
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$OP_PID/status")
T0=$(date +%s.%N)
apply_parallel "$WORK/a"
T_APPLIED=$(date +%s.%N)
wait_all "$AGENTS" "$T0"
T1=$(date +%s.%N)
m=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics")
a_rec=$(metric caravan_operator_reconciles_total "$m")
a_err=$(metric caravan_operator_reconcile_errors_total "$m")
a_pat=$(metric caravan_operator_status_patches_total "$m")
a_rss=$(awk '/VmHWM/ {print $2}' "/proc/$OP_PID/status")
a_el=$(echo "$T1 - $T0" | bc -l)
a_apply=$(echo "$T_APPLIED - $T0" | bc -l)
kill -TERM "$OP_PID"
wait "$OP_PID" || true

# ---- B: operator stopped; N more Agents created; the operator starts cold
# with 2N Agents (N new) and must converge.
log "B: operator stopped; $AGENTS more Agents; cold start"
split_agents b "$WORK/b"
apply_parallel "$WORK/b"
T0=$(date +%s.%N)
start_operator "$WORK/operator-b.log"
wait_all "$((2 * AGENTS))" "$T0"
T1=$(date +%s.%N)
m=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics")
b_rec=$(metric caravan_operator_reconciles_total "$m")
b_err=$(metric caravan_operator_reconcile_errors_total "$m")
b_pat=$(metric caravan_operator_status_patches_total "$m")
b_rss=$(awk '/VmHWM/ {print $2}' "/proc/$OP_PID/status")
b_el=$(echo "$T1 - $T0" | bc -l)
secrets=$(kubectl get secrets -A -l app.kubernetes.io/managed-by=caravan-operator --no-headers | wc -l)

printf '\nCaravan operator benchmark (kube-apiserver 1.20.2 + etcd only, no kubelet; %s cores, load %s)\n' "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '  A. %d Agents applied in %d namespaces to a running operator (concurrency %d)\n' "$AGENTS" "$NAMESPACES" "$CONCURRENCY"
printf '     kubectl apply (8 in parallel)                %.1f s\n' "$a_apply"
printf '     apply start -> all Deployments + status      %.1f s\n' "$a_el"
printf '     reconciles                                   %d (%.1f/s), status patches %d, errors %d\n' "$a_rec" "$(echo "$a_rec / $a_el" | bc -l)" "$a_pat" "$a_err"
printf '     operator RSS idle / peak                     %.1f / %.1f MiB\n' "$(mib "$rss_idle")" "$(mib "$a_rss")"
printf '  B. cold start with %d Agents (%d new)\n' "$((2 * AGENTS))" "$AGENTS"
printf '     start -> all Deployments + status            %.1f s\n' "$b_el"
printf '     reconciles                                   %d (%.1f/s), status patches %d, errors %d\n' "$b_rec" "$(echo "$b_rec / $b_el" | bc -l)" "$b_pat" "$b_err"
printf '     operator RSS peak                            %.1f MiB\n' "$(mib "$b_rss")"
printf '  identity Secrets                                %d (expected %d)\n' "$secrets" "$((2 * AGENTS))"
((secrets == 2 * AGENTS)) || { echo "0 passed, 1 failed"; exit 1; }
echo "1 passed, 0 failed"
