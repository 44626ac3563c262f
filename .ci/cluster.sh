#!/usr/bin/env bash
# CI entry point for tests that need a Kubernetes cluster.
#
#   bash .ci/cluster.sh run -- COMMAND [ARGS...]
#       up.sh (cluster), images.sh (pause, caravan/agent:dev, caravan/operator:dev),
#       KUBECONFIG=target/cluster/kubeconfig, runs COMMAND (stdin /dev/null, bounded),
#       and ALWAYS runs down.sh afterwards (trap), also on failure or a signal.
#       Exit status: COMMAND's, or 1 if the cluster or the images could not be made.
#   bash .ci/cluster.sh up | images | down      the single steps
#
# Environment:
#   CARAVAN_USE_EXISTING_CLUSTER=1 + KUBECONFIG   use that cluster: no up/images/down
#   CARAVAN_ALLOW_STANDIN=1        busybox stand-in images when the release binaries are missing
#   CARAVAN_KEEP_CLUSTER=1         leave the cluster up after `run` (debugging)
#   CARAVAN_CLUSTER_UP_TIMEOUT     seconds for up.sh (default 3000: includes a cold Kubernetes build)
#   CARAVAN_IMAGES_TIMEOUT         seconds for images.sh (default 3600: may run cargo build --release)
#   CARAVAN_TEST_TIMEOUT           seconds for COMMAND (default 3000)
# Daemon logs of a failed run are copied to target/cluster/logs/ before teardown.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
C="$ROOT/tests/cluster"

say() { printf '[ci-cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

existing() { [[ "${CARAVAN_USE_EXISTING_CLUSTER:-0}" == 1 && -n "${KUBECONFIG:-}" ]]; }

timed() { # LABEL TIMEOUT COMMAND...
  local label="$1" limit="$2" t0 rc
  shift 2
  t0=$(date +%s)
  timeout -k 30 "$limit" "$@" </dev/null
  rc=$?
  say "$label: exit $rc after $(($(date +%s) - t0))s"
  return "$rc"
}

down() { timed down.sh 600 bash "$C/down.sh"; }

# Runs on EXIT of `run`: keeps logs of a failed run, always tears the cluster down.
# shellcheck disable=SC2317
teardown() {
  local status=$?
  trap - EXIT INT TERM
  ((status != 0)) && collect_logs
  if [[ "${CARAVAN_KEEP_CLUSTER:-0}" == 1 ]]; then
    say "CARAVAN_KEEP_CLUSTER=1: leaving the cluster up (bash tests/cluster/down.sh to stop it)"
  else
    down || say "down.sh failed (exit $?)"
  fi
  say "total $(($(date +%s) - T0))s, exit $status"
  exit "$status"
}

run() {
  [[ "${1:-}" == -- ]] && shift
  (($#)) || usage
  if existing; then
    say "using the existing cluster in KUBECONFIG=$KUBECONFIG (no up/images/down)"
    timed test "${CARAVAN_TEST_TIMEOUT:-3000}" "$@"
    return $?
  fi
  local rc=0
  T0=$(date +%s)
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  timed up.sh "${CARAVAN_CLUSTER_UP_TIMEOUT:-3000}" bash "$C/up.sh" || exit 1
  timed images.sh "${CARAVAN_IMAGES_TIMEOUT:-3600}" bash "$C/images.sh" all || exit 1
  export KUBECONFIG="$ROOT/target/cluster/kubeconfig"
  say "running: $*"
  timed test "${CARAVAN_TEST_TIMEOUT:-3000}" "$@" || rc=$?
  exit "$rc"
}

collect_logs() {
  local state="${CARAVAN_CLUSTER_STATE:-/var/lib/caravan-cluster}"
  [[ -d "$state/log" ]] || return 0
  mkdir -p "$ROOT/target/cluster/logs"
  cp -f "$state"/log/*.log "$ROOT/target/cluster/logs/" 2>/dev/null || true
  if [[ -f "$state/admin.kubeconfig" ]]; then
    kubectl --kubeconfig "$state/admin.kubeconfig" --request-timeout 10s get nodes,pods -A -o wide \
      >"$ROOT/target/cluster/logs/objects.txt" 2>&1 || true
  fi
  say "daemon logs copied to target/cluster/logs/"
}

case "${1:-}" in
  run) shift; run "$@" ;;
  up) existing || timed up.sh "${CARAVAN_CLUSTER_UP_TIMEOUT:-3000}" bash "$C/up.sh" ;;
  images) existing || timed images.sh "${CARAVAN_IMAGES_TIMEOUT:-3600}" bash "$C/images.sh" all ;;
  down) existing || down ;;
  *) usage ;;
esac
