# shellcheck shell=bash
# Helpers for bash tests against the local cluster (or any cluster in KUBECONFIG).
#
#   source tests/cluster/lib.sh
#   fresh_namespace NS smoke        # creates smoke-<random>, sets $NS, deletes it on EXIT
#   kc -n "$NS" apply -f thing.yaml # kubectl with a request timeout
#   with_namespace smoke my_test    # runs `my_test` with $NS set, then deletes the namespace
#
# Namespaces are labelled caravan.dev/test=true. CARAVAN_KEEP_NAMESPACES=1 keeps them
# (for debugging). If your script sets its own EXIT trap, call cleanup_namespaces in it.
# Rust tests do the same through kube: create a namespace with a random suffix and the
# same label, wait for its default ServiceAccount, delete it in a drop guard.

_CARAVAN_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${KUBECONFIG:=$(cd "$_CARAVAN_LIB_DIR/../.." && pwd)/target/cluster/kubeconfig}"
export KUBECONFIG
CARAVAN_TEST_NAMESPACES=()

# tlog MESSAGE... — one timestamped line on stderr, tagged $CARAVAN_LOG_TAG (default test).
tlog() { printf '[%s %s] %s\n' "${CARAVAN_LOG_TAG:-test}" "$(date -u +%H:%M:%S)" "$*" >&2; }

# kc ARGS... — kubectl with a bounded request time.
kc() { kubectl --request-timeout 30s "$@"; }

# wait_for TIMEOUT_SECONDS DESCRIPTION COMMAND... — bounded polling, once a second.
wait_for() {
  local timeout="$1" what="$2" i
  shift 2
  for ((i = 0; i < timeout; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  tlog "timed out after ${timeout}s waiting for: $what"
  return 1
}

# fresh_namespace VAR [PREFIX] — creates a new namespace, stores its name in VAR,
# and registers it for deletion when the shell exits.
fresh_namespace() {
  local __var="$1" prefix="${2:-caravan-test}" name
  name="$prefix-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  kc create namespace "$name" >/dev/null || return 1
  kc label namespace "$name" caravan.dev/test=true >/dev/null || true
  CARAVAN_TEST_NAMESPACES+=("$name")
  _caravan_install_exit_trap
  # Pods are rejected until the namespace's default ServiceAccount exists.
  wait_for 60 "ServiceAccount default in $name" kc -n "$name" get serviceaccount default || return 1
  printf -v "$__var" '%s' "$name"
  tlog "namespace $name ready"
}

# delete_namespace NAME — deletes it and waits (bounded) until it is gone.
delete_namespace() {
  local name="$1"
  if [[ "${CARAVAN_KEEP_NAMESPACES:-0}" == 1 ]]; then
    tlog "keeping namespace $name (CARAVAN_KEEP_NAMESPACES=1)"
    return 0
  fi
  kc delete namespace "$name" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  wait_for 120 "namespace $name deleted" _caravan_ns_gone "$name" || tlog "namespace $name still terminating"
}
_caravan_ns_gone() { ! kc get namespace "$1" >/dev/null 2>&1; }

# clear_namespaces NS... — deletes these fixed-name namespaces if they exist
# (a previous suite may still be terminating them) and waits, bounded, until
# each is gone, so the caller can create them afresh.
clear_namespaces() {
  local ns
  kc delete namespace "$@" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  for ns in "$@"; do
    wait_for 180 "namespace $ns gone" _caravan_ns_gone "$ns" || tlog "namespace $ns still terminating"
  done
}

cleanup_namespaces() {
  local ns
  for ns in "${CARAVAN_TEST_NAMESPACES[@]}"; do delete_namespace "$ns"; done
  CARAVAN_TEST_NAMESPACES=()
}

_caravan_install_exit_trap() {
  [[ "${_CARAVAN_TRAP_SET:-0}" == 1 ]] && return 0
  local previous
  previous=$(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT$/\1/")
  # shellcheck disable=SC2064
  trap "cleanup_namespaces; ${previous:-:}" EXIT
  _CARAVAN_TRAP_SET=1
}

# with_namespace PREFIX COMMAND... — runs COMMAND with NS set to a fresh namespace,
# deletes the namespace afterwards whatever happens, returns COMMAND's status.
with_namespace() {
  local prefix="$1" NS rc=0
  shift
  fresh_namespace NS "$prefix" || return 1
  NS="$NS" "$@" || rc=$?
  if ((rc != 0)); then dump_namespace "$NS"; fi
  delete_namespace "$NS"
  local keep=() n
  for n in "${CARAVAN_TEST_NAMESPACES[@]}"; do [[ "$n" == "$NS" ]] || keep+=("$n"); done
  CARAVAN_TEST_NAMESPACES=("${keep[@]}")
  return "$rc"
}

# dump_namespace NAME — what a failing test wants to see.
dump_namespace() {
  local ns="$1" p
  {
    echo "----- namespace $ns: objects"
    kc -n "$ns" get all -o wide 2>&1
    echo "----- namespace $ns: events"
    kc -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -n 40
    for p in $(kc -n "$ns" get pods -o name 2>/dev/null); do
      echo "----- $p: describe"
      kc -n "$ns" describe "$p" 2>&1 | tail -n 30
      echo "----- $p: logs"
      kc -n "$ns" logs "$p" --all-containers --tail 50 2>&1
    done
  } >&2
}
