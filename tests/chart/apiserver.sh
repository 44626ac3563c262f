# shellcheck shell=bash
# A bare API server for chart tests (sourced): etcd + kube-apiserver 1.20.2 on
# loopback, no controller-manager, scheduler or kubelet, so objects are stored
# and validated but no pod ever runs. It is not the machine-wide cluster (no
# lock needed): its own ports and a temporary directory, stopped on EXIT.
#
#   source tests/chart/apiserver.sh
#   apiserver_start            # sets KUBECONFIG, WORK; SKIPs (exit 0) without binaries
#
# Ports: CARAVAN_CHART_ETCD_PORT (default 24983, and +1), CARAVAN_CHART_API_PORT (16483).
CHART_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K8S_BIN="${CARAVAN_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/caravan/kubernetes/1.20.2/bin}"
ETCD_PORT="${CARAVAN_CHART_ETCD_PORT:-24983}"
API_PORT="${CARAVAN_CHART_API_PORT:-16483}"
APISERVER_PIDS=()

tlog() { printf '[chart %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

apiserver_stop() {
  local p
  for p in "${APISERVER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${APISERVER_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  APISERVER_PIDS=()
  [[ -n "${WORK:-}" && "${CARAVAN_KEEP:-0}" != 1 ]] && rm -rf "$WORK"
}

apiserver_start() {
  if [[ ! -x "$K8S_BIN/kube-apiserver" ]] || ! command -v etcd >/dev/null; then
    echo "SKIP: chart tests: no kube-apiserver in $K8S_BIN or no etcd (tests/cluster/up.sh installs both)"
    exit 0
  fi
  WORK=$(mktemp -d /tmp/caravan-chart.XXXXXX)
  trap apiserver_stop EXIT
  mkdir -p "$WORK/pki"
  openssl genrsa -out "$WORK/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$WORK/pki/sa.key" -pubout -out "$WORK/pki/sa.pub" 2>/dev/null
  local token
  token="chart-$(openssl rand -hex 12)"
  echo "$token,chart-admin,chart-admin,\"system:masters\"" >"$WORK/pki/tokens.csv"
  etcd --name chart --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "chart=http://127.0.0.1:$((ETCD_PORT + 1))" >"$WORK/etcd.log" 2>&1 &
  APISERVER_PIDS+=($!)
  "$K8S_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
    --cert-dir "$WORK/pki/apiserver" --token-auth-file "$WORK/pki/tokens.csv" \
    --authorization-mode RBAC --service-account-key-file "$WORK/pki/sa.pub" \
    --service-account-signing-key-file "$WORK/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.235.0.0/16 --profiling=false >"$WORK/apiserver.log" 2>&1 &
  APISERVER_PIDS+=($!)
  cat >"$WORK/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: chart
  cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}
users:
- name: chart
  user: {token: "$token"}
contexts:
- name: chart
  context: {cluster: chart, user: chart}
current-context: chart
KCFG
  export KUBECONFIG="$WORK/kubeconfig"
  local i
  for ((i = 0; i < 120; i++)); do
    kubectl get --raw /readyz >/dev/null 2>&1 && break
    sleep 1
  done
  kubectl get --raw /readyz >/dev/null || { tail -20 "$WORK/apiserver.log" >&2; return 1; }
  tlog "API server $(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') on 127.0.0.1:$API_PORT"
}
