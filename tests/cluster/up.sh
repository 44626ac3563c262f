#!/usr/bin/env bash
# Brings up a real single-node Kubernetes (etcd, kube-apiserver, controller-manager,
# scheduler, kube-proxy, containerd, kubelet, CNI bridge) on this machine, idempotently.
# Writes the kubeconfig to target/cluster/kubeconfig (relative to the repo root).
# Re-running on a running cluster is a no-op (it only rewrites the kubeconfig).
set -euo pipefail
# shellcheck source=tests/cluster/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if use_existing_cluster; then
  log "CARAVAN_USE_EXISTING_CLUSTER=1: using the cluster in KUBECONFIG=$KUBECONFIG, nothing to start"
  exit 0
fi
need_root
T0=$(date +%s)

# ---------------------------------------------------------------- packages + binaries
apt_install etcd-server containerd runc containernetworking-plugins iptables conntrack \
  buildah busybox-static openssl iproute2 curl ca-certificates util-linux
command -v kubectl >/dev/null || apt_install kubernetes-client
"$CLUSTER_DIR/build-kubernetes.sh"

mkdir -p "$RUN_DIR" "$LOG_DIR" "$PKI_DIR" "$KUBELET_ROOT" "$CONTAINERD_ROOT" \
  "$CONTAINERD_STATE" "$CNI_CONF_DIR" "$STATE_DIR/etcd" "$OUT_DIR"
chmod 700 "$STATE_DIR" "$PKI_DIR"

# Serialise concurrent up/down runs (e.g. two checkouts on one machine).
exec 8>"$STATE_DIR/.lock"
flock -w 600 8 || die "another up.sh/down.sh holds $STATE_DIR/.lock"

# ---------------------------------------------------------------- process helpers
is_running() { # NAME
  local pid
  [[ -f "$RUN_DIR/$1.pid" ]] || return 1
  pid=$(cat "$RUN_DIR/$1.pid")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# start NAME BINARY ARGS... — runs detached (own session), records the PID.
start() {
  local name="$1"
  shift
  if is_running "$name"; then
    log "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"
    return 0
  fi
  log "starting $name"
  # bash writes its own PID and then execs the daemon, so the PID file is exact.
  # shellcheck disable=SC2016
  # fd 8 (the up/down lock) is closed so that daemons never hold the lock.
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/$name.pid" "$@" \
    </dev/null >>"$LOG_DIR/$name.log" 2>&1 8>&- &
  local i
  for ((i = 0; i < 50; i++)); do [[ -s "$RUN_DIR/$name.pid" ]] && break; sleep 0.1; done
  [[ -s "$RUN_DIR/$name.pid" ]] || die "$name did not start"
}

# Fails fast (with the log tail) if the daemon died while we wait for it.
wait_healthy() { # NAME TIMEOUT DESCRIPTION COMMAND...
  local name="$1" timeout="$2" what="$3" i
  shift 3
  for ((i = 0; i < timeout; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! is_running "$name"; then
      tail -n 30 "$LOG_DIR/$name.log" >&2 || true
      die "$name exited (log: $LOG_DIR/$name.log)"
    fi
    sleep 1
  done
  tail -n 30 "$LOG_DIR/$name.log" >&2 || true
  die "timed out after ${timeout}s waiting for $what (log: $LOG_DIR/$name.log)"
}

# ---------------------------------------------------------------- node address
# A non-loopback address on an interface of our own: with a loopback node IP the
# API server refuses to proxy `kubectl logs/exec` to the kubelet. A dummy link if
# the kernel has it, else an empty bridge (works just as well as a local address).
if ! ip link show "$NODE_IFACE" >/dev/null 2>&1; then
  log "creating interface $NODE_IFACE with $NODE_IP"
  ip link add "$NODE_IFACE" type dummy 2>/dev/null || ip link add "$NODE_IFACE" type bridge
  echo "$NODE_IFACE" >"$STATE_DIR/created-interfaces"
fi
ip addr show dev "$NODE_IFACE" | grep "inet $NODE_IP/" >/dev/null || ip addr add "$NODE_IP/32" dev "$NODE_IFACE"
ip link set "$NODE_IFACE" up
# Pods reach the outside through the bridge (CNI ipMasq); harmless if already on.
sysctl -qw net.ipv4.ip_forward=1 2>/dev/null || log "could not enable ip_forward (pods get no egress)"

# ---------------------------------------------------------------- PKI + tokens
if [[ ! -f "$PKI_DIR/sa.key" ]]; then
  openssl genrsa -out "$PKI_DIR/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub" 2>/dev/null
fi
if [[ ! -f "$PKI_DIR/tokens.csv" ]]; then
  # A test-only admin token in system:masters (the cluster listens on local addresses only).
  token="caravan-$(openssl rand -hex 16)"
  echo "$token,caravan-admin,caravan-admin,\"system:masters\"" >"$PKI_DIR/tokens.csv"
  chmod 600 "$PKI_DIR/tokens.csv"
fi
TOKEN=$(cut -d, -f1 "$PKI_DIR/tokens.csv")
APISERVER_URL="https://$NODE_IP:$APISERVER_PORT"

# ---------------------------------------------------------------- etcd
start etcd etcd --name caravan --data-dir "$STATE_DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "caravan=http://127.0.0.1:$ETCD_PEER_PORT" \
  --quota-backend-bytes 2147483648 --snapshot-count 10000
wait_healthy etcd 60 "etcd health" curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

# ---------------------------------------------------------------- kube-apiserver
start kube-apiserver "$K8S_BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" \
  --secure-port "$APISERVER_PORT" --insecure-port 0 \
  --cert-dir "$PKI_DIR/apiserver" \
  --token-auth-file "$PKI_DIR/tokens.csv" \
  --authorization-mode Node,RBAC \
  --service-account-key-file "$PKI_DIR/sa.pub" \
  --service-account-signing-key-file "$PKI_DIR/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --kubelet-preferred-address-types InternalIP \
  --allow-privileged=true \
  --profiling=false
api_ready() {
  curl -fsS --max-time 2 --cacert "$PKI_DIR/apiserver/apiserver.crt" \
    -H "Authorization: Bearer $TOKEN" "$APISERVER_URL/readyz"
}
wait_healthy kube-apiserver 120 "kube-apiserver /readyz" api_ready

# ---------------------------------------------------------------- kubeconfig
write_kubeconfig() { # FILE
  local ca tmp
  ca=$(base64 -w0 <"$PKI_DIR/apiserver/apiserver.crt")
  tmp="$1.tmp.$$"
  (umask 077 && cat >"$tmp" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: caravan
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $ca
users:
- name: caravan-admin
  user:
    token: $TOKEN
contexts:
- name: caravan
  context:
    cluster: caravan
    user: caravan-admin
    namespace: default
current-context: caravan
KCFG
  )
  mv "$tmp" "$1"
}
write_kubeconfig "$ADMIN_KUBECONFIG"
KUBECTL=(kubectl --kubeconfig "$ADMIN_KUBECONFIG")

# ---------------------------------------------------------------- controllers
start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
  --kubeconfig "$ADMIN_KUBECONFIG" \
  --controllers '*,-nodeipam,-csrsigning' \
  --service-account-private-key-file "$PKI_DIR/sa.key" \
  --root-ca-file "$PKI_DIR/apiserver/apiserver.crt" \
  --use-service-account-credentials=true \
  --allocate-node-cidrs=false \
  --port 0 --secure-port 0 --leader-elect=false --profiling=false
start kube-scheduler "$K8S_BIN/kube-scheduler" \
  --kubeconfig "$ADMIN_KUBECONFIG" \
  --port 0 --secure-port 0 --leader-elect=false --profiling=false
start kube-proxy "$K8S_BIN/kube-proxy" \
  --kubeconfig "$ADMIN_KUBECONFIG" \
  --hostname-override "$NODE_NAME" \
  --proxy-mode iptables \
  --cluster-cidr "$POD_SUBNET" \
  --bind-address "$NODE_IP" \
  --nodeport-addresses "$NODE_IP/32" \
  --healthz-bind-address 127.0.0.1:10256 \
  --metrics-bind-address 127.0.0.1:10249 \
  --conntrack-max-per-core 0 \
  --profiling=false

# ---------------------------------------------------------------- CNI
cat >"$CNI_CONF_DIR/10-caravan.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK_NAME",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BRIDGE",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE_DIR/cni/ipam",
        "ranges": [[{ "subnet": "$POD_SUBNET" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
CNI

# ---------------------------------------------------------------- containerd
CONTAINERD_CONFIG="$STATE_DIR/containerd.toml"
containerd config default >"$CONTAINERD_CONFIG.tmp"
# Own root, state and socket (never the machine's containerd); pause image built
# locally; CNI from Debian's plugins; restrict_oom_score_adj because this machine
# lacks CAP_SYS_RESOURCE (else every sandbox fails with "can't get final child's PID").
sed -i -E \
  -e "s#^root = .*#root = \"$CONTAINERD_ROOT\"#" \
  -e "s#^state = .*#state = \"$CONTAINERD_STATE\"#" \
  -e "/^\[grpc\]/,/^\[/ s#^  address = .*#  address = \"$CONTAINERD_SOCK\"#" \
  -e "/^\[ttrpc\]/,/^\[/ s#^  address = .*#  address = \"$CONTAINERD_STATE/containerd.sock.ttrpc\"#" \
  -e "s#sandbox_image = .*#sandbox_image = \"docker.io/$PAUSE_IMAGE\"#" \
  -e "s#restrict_oom_score_adj = .*#restrict_oom_score_adj = true#" \
  -e "s#^(\s*)bin_dir = .*#\1bin_dir = \"$CNI_BIN_DIR\"#" \
  -e "s#^(\s*)conf_dir = .*#\1conf_dir = \"$CNI_CONF_DIR\"#" \
  -e "s#^(\s*)SystemdCgroup = .*#\1SystemdCgroup = false#" \
  "$CONTAINERD_CONFIG.tmp"
for want in "address = \"$CONTAINERD_SOCK\"" "sandbox_image = \"docker.io/$PAUSE_IMAGE\"" \
  "restrict_oom_score_adj = true" "conf_dir = \"$CNI_CONF_DIR\""; do
  grep -qF "$want" "$CONTAINERD_CONFIG.tmp" || die "could not set '$want' in the containerd config"
done
mv "$CONTAINERD_CONFIG.tmp" "$CONTAINERD_CONFIG"
start containerd containerd --config "$CONTAINERD_CONFIG"
CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)
wait_healthy containerd 60 "containerd socket" "${CTR[@]}" version

# The pause image (from the Kubernetes tree's pause.c) must be there before any pod.
if ! "${CTR[@]}" images ls -q | grep -x "docker.io/$PAUSE_IMAGE" >/dev/null; then
  "$CLUSTER_DIR/images.sh" pause
fi

# ---------------------------------------------------------------- kubelet
cat >"$STATE_DIR/kubelet-config.yaml" <<KCONF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: true    # test cluster only: local addresses, no credentials
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
maxPods: 60
imageGCHighThresholdPercent: 100   # images are imported, never pulled: never GC them
imageGCLowThresholdPercent: 99
# Absolute floors, not shares of the disk: 1% of a 252 GB root is 2.5 GB,
# more than a test run needs left free; a run on a nearly full disk must
# not lose its pods to DiskPressure half way through the suites.
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "512Mi"
  nodefs.inodesFree: "1%"
  imagefs.available: "512Mi"
serializeImagePulls: false
KCONF
start kubelet "$K8S_BIN/kubelet" \
  --config "$STATE_DIR/kubelet-config.yaml" \
  --kubeconfig "$ADMIN_KUBECONFIG" \
  --container-runtime remote \
  --container-runtime-endpoint "unix://$CONTAINERD_SOCK" \
  --image-service-endpoint "unix://$CONTAINERD_SOCK" \
  --runtime-request-timeout 5m \
  --pod-infra-container-image "docker.io/$PAUSE_IMAGE" \
  --hostname-override "$NODE_NAME" \
  --node-ip "$NODE_IP" \
  --root-dir "$KUBELET_ROOT" \
  --cert-dir "$KUBELET_ROOT/pki"

node_ready() {
  [[ "$("${KUBECTL[@]}" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}
wait_healthy kubelet 180 "node $NODE_NAME Ready" node_ready
# Pods can only be created once the namespace's default ServiceAccount exists.
wait_until 60 "default ServiceAccount" "${KUBECTL[@]}" -n default get serviceaccount default ||
  die "the controller-manager did not create the default ServiceAccount (log: $LOG_DIR/kube-controller-manager.log)"

write_kubeconfig "$OUT_KUBECONFIG"
log "cluster up in $(( $(date +%s) - T0 ))s; export KUBECONFIG=$OUT_KUBECONFIG"
