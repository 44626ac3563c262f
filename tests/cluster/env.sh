# shellcheck shell=bash disable=SC2034
# Shared settings for the local single-node cluster scripts (sourced, not run).
# Everything can be overridden from the environment.

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The sourcing script's arguments (a sourced file sees its caller's "$@"), for need_root.
_CARAVAN_SCRIPT_ARGS=("$@")
REPO_ROOT="$(cd "$CLUSTER_DIR/../.." && pwd)"

K8S_VERSION="${CARAVAN_K8S_VERSION:-1.20.2}"
CACHE_ROOT="${CARAVAN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/caravan}"
K8S_CACHE="$CACHE_ROOT/kubernetes/$K8S_VERSION"
K8S_BIN="$K8S_CACHE/bin"

# Machine-wide runtime state: one cluster per machine, whichever checkout started it.
STATE_DIR="${CARAVAN_CLUSTER_STATE:-/var/lib/caravan-cluster}"
RUN_DIR="$STATE_DIR/run"      # pid files
LOG_DIR="$STATE_DIR/log"
PKI_DIR="$STATE_DIR/pki"
KUBELET_ROOT="$STATE_DIR/kubelet"
CONTAINERD_ROOT="$STATE_DIR/containerd"
CONTAINERD_STATE="/run/caravan-containerd"
CONTAINERD_SOCK="$CONTAINERD_STATE/containerd.sock"
CNI_CONF_DIR="$STATE_DIR/cni/net.d"
CNI_BIN_DIR="${CARAVAN_CNI_BIN_DIR:-/usr/lib/cni}"
ADMIN_KUBECONFIG="$STATE_DIR/admin.kubeconfig"

# Where tests find the cluster (relative to the repo root of the calling checkout).
OUT_DIR="$REPO_ROOT/target/cluster"
OUT_KUBECONFIG="$OUT_DIR/kubeconfig"

ETCD_CLIENT_PORT="${CARAVAN_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${CARAVAN_ETCD_PEER_PORT:-23800}"
APISERVER_PORT="${CARAVAN_APISERVER_PORT:-6443}"
KUBELET_PORT="${CARAVAN_KUBELET_PORT:-10250}"

# Node address on a dummy interface: non-loopback, so `kubectl logs/exec` work.
NODE_IFACE="${CARAVAN_NODE_IFACE:-caravan0}"
NODE_IP="${CARAVAN_NODE_IP:-10.231.0.1}"
NODE_NAME="${CARAVAN_NODE_NAME:-caravan-node}"
# Pod network behind a bridge created by the CNI bridge plugin.
POD_BRIDGE="${CARAVAN_POD_BRIDGE:-caravanbr0}"
POD_SUBNET="${CARAVAN_POD_SUBNET:-10.232.0.0/24}"
SERVICE_CIDR="${CARAVAN_SERVICE_CIDR:-10.233.0.0/24}"
CNI_NETWORK_NAME="caravan"

PAUSE_IMAGE="caravan/pause:3.2"

log() { printf '[cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# wait_until TIMEOUT_SECONDS DESCRIPTION COMMAND... — bounded polling, once a second.
wait_until() {
  local timeout="$1" what="$2" i
  shift 2
  for ((i = 0; i < timeout; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "timed out after ${timeout}s waiting for: $what"
  return 1
}

use_existing_cluster() {
  [[ "${CARAVAN_USE_EXISTING_CLUSTER:-0}" == 1 && -n "${KUBECONFIG:-}" ]]
}

# need_root — root runs on; a user is re-run through sudo when sudo exists
# (environment kept: CARAVAN_* settings still apply); otherwise a clear error.
need_root() {
  [[ "$(id -u)" == 0 ]] && return 0
  if command -v sudo >/dev/null 2>&1 && [[ "${CARAVAN_NO_SUDO:-0}" != 1 && -z "${_CARAVAN_VIA_SUDO:-}" ]]; then
    log "not root: re-running with sudo"
    exec sudo --preserve-env _CARAVAN_VIA_SUDO=1 bash "$0" "${_CARAVAN_SCRIPT_ARGS[@]}"
  fi
  die "this script must run as root (containerd and the kubelet need it): run it as root, or install sudo"
}

# apt_install PKG... — installs only the packages that are missing.
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq || log "apt-get update failed; trying install anyway"
  timeout 1200 apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}
