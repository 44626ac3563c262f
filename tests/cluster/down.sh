#!/usr/bin/env bash
# Stops the local cluster that up.sh started and removes its state: processes by
# their PID files (never by name), pods torn down through the kubelet (so CNI
# removes veths and NAT rules), leftover container shims, mounts under the
# kubelet/containerd directories, network namespaces of our pods, the pod bridge
# and the node interface, and the state directory. Safe to run when nothing runs.
set -uo pipefail
# shellcheck source=tests/cluster/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if use_existing_cluster; then
  log "CARAVAN_USE_EXISTING_CLUSTER=1: leaving the cluster in KUBECONFIG=$KUBECONFIG alone"
  exit 0
fi
need_root
T0=$(date +%s)
case "$STATE_DIR" in
  *caravan*) ;;
  *) die "refusing to work with STATE_DIR=$STATE_DIR (its name must contain 'caravan')" ;;
esac
if [[ ! -d "$STATE_DIR" ]]; then
  log "no cluster state in $STATE_DIR: nothing to do"
  rm -f "$OUT_KUBECONFIG"
  exit 0
fi
exec 8>"$STATE_DIR/.lock"
flock -w 600 8 || die "another up.sh/down.sh holds $STATE_DIR/.lock"

pid_of() { [[ -f "$RUN_DIR/$1.pid" ]] && cat "$RUN_DIR/$1.pid"; }
alive() { local pid; pid=$(pid_of "$1") && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }

# stop NAME [GRACE_SECONDS] — SIGTERM, bounded wait, then SIGKILL; by PID file only.
stop() {
  local name="$1" grace="${2:-20}" pid i
  pid=$(pid_of "$name") || return 0
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not exit in ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  fi
  rm -f "$RUN_DIR/$name.pid"
}

CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)
KUBECTL=(kubectl --kubeconfig "$ADMIN_KUBECONFIG" --request-timeout 10s)

# 1. No controller may recreate what we delete.
stop kube-controller-manager
stop kube-scheduler

# 2. Delete every pod while the kubelet still runs: it stops the sandboxes, and
#    CNI DEL removes each pod's veth, IP lease and NAT rules.
running_sandboxes() { "${CTR[@]}" tasks ls -q 2>/dev/null | grep -c . ; }
if alive kube-apiserver && alive kubelet && alive containerd; then
  if "${KUBECTL[@]}" get pods -A -o name 2>/dev/null | grep . >/dev/null; then
    log "deleting all pods through the kubelet"
    "${KUBECTL[@]}" delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1
    for ((i = 0; i < 60; i++)); do
      [[ "$(running_sandboxes)" == 0 ]] && break
      sleep 1
    done
    log "$(running_sandboxes) container task(s) left after deleting pods"
  fi
fi

# 3. Collect our pods' network namespaces before containerd goes away.
NETNS=()
if alive containerd; then
  while read -r id; do
    [[ -n "$id" ]] || continue
    while read -r ns; do NETNS+=("$ns"); done < <("${CTR[@]}" containers info "$id" 2>/dev/null |
      grep -o '"/var/run/netns/cni-[0-9a-f-]*"\|"/run/netns/cni-[0-9a-f-]*"' | tr -d '"' | sort -u)
  done < <("${CTR[@]}" containers ls -q 2>/dev/null)
fi

stop kubelet
stop kube-proxy
if [[ -x "$K8S_BIN/kube-proxy" ]]; then
  "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true   # removes its KUBE-* iptables chains
fi

# 4. Whatever still runs in containerd: kill and delete tasks, then the shims.
if alive containerd; then
  while read -r id; do
    [[ -n "$id" ]] || continue
    "${CTR[@]}" tasks kill --signal SIGKILL "$id" >/dev/null 2>&1 || true
  done < <("${CTR[@]}" tasks ls -q 2>/dev/null)
  for ((i = 0; i < 20; i++)); do
    "${CTR[@]}" tasks ls 2>/dev/null | awk 'NR>1 && $3!="STOPPED"' | grep . >/dev/null || break
    sleep 0.5
  done
  while read -r id; do
    [[ -n "$id" ]] || continue
    "${CTR[@]}" tasks delete --force "$id" >/dev/null 2>&1 || true
  done < <("${CTR[@]}" tasks ls -q 2>/dev/null)
fi
stop containerd 30
# Shims that outlived containerd: their PIDs are in the task bundles it created.
for f in "$CONTAINERD_STATE"/io.containerd.runtime.v2.task/*/*/shim.pid; do
  [[ -f "$f" ]] || continue
  pid=$(cat "$f")
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    log "killing leftover shim pid $pid ($f)"
    kill -KILL "$pid" 2>/dev/null || true
  fi
done

stop kube-apiserver
stop etcd

# 5. Mounts under our directories (deepest first), then our pods' netns.
unmount_under() { # PREFIX...
  local prefix mp
  for prefix in "$@"; do
    while read -r mp; do
      umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "could not unmount $mp"
    done < <(awk '{print $2}' /proc/self/mounts | sed 's/\\040/ /g' |
      grep -E "^${prefix}(/|$)" | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)
  done
}
unmount_under "$KUBELET_ROOT" "$CONTAINERD_STATE" "$CONTAINERD_ROOT" "/run/caravan-buildah"
for ns in "${NETNS[@]}"; do
  [[ -e "$ns" ]] || continue
  umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true
  rm -f "$ns"
done

# 6. NAT rules the bridge plugin left for pods that were not torn down by CNI.
table=nat chain=POSTROUTING
mapfile -t leftovers < <(iptables -t "$table" -S "$chain" 2>/dev/null |
  grep -F "name: \\\"$CNI_NETWORK_NAME\\\"" | grep -o -- '-j CNI-[0-9a-f]*' | cut -d' ' -f2 | sort -u)
for c in "${leftovers[@]}"; do
  log "removing leftover CNI NAT chain $c"
  while read -r n; do iptables -t "$table" -D "$chain" "$n" 2>/dev/null; done < <(
    iptables -t "$table" -L "$chain" --line-numbers -n 2>/dev/null | awk -v c="$c" '$2==c {print $1}' | sort -rn)
  iptables -t "$table" -F "$c" 2>/dev/null
  iptables -t "$table" -X "$c" 2>/dev/null
done

# The kubelet's and kube-proxy's own chains (KUBE-FIREWALL, KUBE-MARK-*, canaries…):
# unhook them from the built-in chains, then flush and delete them. Only KUBE-* chains.
for ipt in iptables ip6tables; do
  command -v "$ipt" >/dev/null || continue
  for table in filter nat mangle; do
    while read -r rule; do
      eval "$ipt -t $table -D ${rule#-A }" 2>/dev/null || true
    done < <("$ipt" -t "$table" -S 2>/dev/null |
      grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-[A-Z0-9-]+( |$)')
    mapfile -t chains < <("$ipt" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}')
    for c in "${chains[@]}"; do "$ipt" -t "$table" -F "$c" 2>/dev/null; done
    for c in "${chains[@]}"; do "$ipt" -t "$table" -X "$c" 2>/dev/null; done
  done
done

# 7. Interfaces we created: the pod bridge (made by the CNI bridge plugin) and the node link.
ip link show "$POD_BRIDGE" >/dev/null 2>&1 && ip link del "$POD_BRIDGE"
if [[ -f "$STATE_DIR/created-interfaces" ]]; then
  while read -r dev; do
    [[ -n "$dev" ]] && ip link show "$dev" >/dev/null 2>&1 && ip link del "$dev"
  done <"$STATE_DIR/created-interfaces"
fi

# 8. State. Refuse if anything is still mounted below it.
if awk '{print $2}' /proc/self/mounts | grep -E "^($STATE_DIR|$CONTAINERD_STATE)(/|$)" >/dev/null; then
  log "mounts remain under $STATE_DIR or $CONTAINERD_STATE; not deleting them:"
  awk '{print $2}' /proc/self/mounts | grep -E "^($STATE_DIR|$CONTAINERD_STATE)(/|$)" >&2
  exit 1
fi
rm -rf "$CONTAINERD_STATE" "/run/caravan-buildah"
rm -rf "$STATE_DIR"
rm -f "$OUT_KUBECONFIG"
log "cluster down in $(( $(date +%s) - T0 ))s"
