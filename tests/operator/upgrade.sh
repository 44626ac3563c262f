#!/usr/bin/env bash
# An operator upgrade restarts no agent whose desired state did not change
# (real cluster; run by tests/e2e.sh after the operator e2e):
#   chart installed → three Agents Ready → their pods, pod-template hashes and
#   ReplicaSets recorded → `helm upgrade` with a new operator image tag (the same
#   binary under another tag: a new image for Kubernetes), other operator
#   settings changed → the new operator replicas lead and reconcile every Agent
#   (annotations touched to force it) → every agent pod is the same pod, same
#   hash, no new ReplicaSet, no restart.
# Control: a chart change that does change the agents' desired state
# (agent.logFormat=json) rolls them, and their logs are then JSON lines.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tests/cluster/lib.sh
source "$ROOT/tests/cluster/lib.sh"
# shellcheck source=tests/cluster/env.sh
source "$ROOT/tests/cluster/env.sh"
HELM="${HELM:-$ROOT/tests/cluster/helm}"
RELEASE=caravan
SYS_NS=caravan-system
PASS=0
FAIL=0
check() {
  local name="$1"
  shift
  if "$@"; then tlog "PASS $name"; PASS=$((PASS + 1)); else tlog "FAIL $name"; FAIL=$((FAIL + 1)); fi
}
if ! kc version >/dev/null 2>&1; then echo "SKIP: upgrade: no reachable cluster"; exit 0; fi
CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)
trap 'cleanup_namespaces; "$HELM" uninstall "$RELEASE" -n "$SYS_NS" >/dev/null 2>&1 || true' EXIT

values="$ROOT/examples/provider/values.yaml"
kc create namespace "$SYS_NS" >/dev/null 2>&1 || true
tlog "helm upgrade --install $RELEASE (operator caravan/operator:dev)"
"$HELM" upgrade --install --take-ownership "$RELEASE" "$ROOT/charts/caravan" -n "$SYS_NS" -f "$values" >/dev/null
check "operator available" kc -n "$SYS_NS" wait deployment/caravan-operator --for=condition=Available --timeout=180s

fresh_namespace NS upgrade
kc -n "$NS" create secret generic storage --from-literal=atomic_write_dir=/data/.tmp >/dev/null
for a in u1 u2 u3; do
  printf -- '---\napiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: %s}\nspec:\n  storage: {scheme: fs, secretRef: {name: storage}}\n' "$a"
done | kc -n "$NS" apply -f - >/dev/null
all_ready() {
  local a
  for a in u1 u2 u3; do
    [[ "$(kc -n "$NS" get agent "$a" -o jsonpath='{.status.phase}')" == Ready ]] || return 1
  done
}
check "three Agents Ready" wait_for 240 "agents Ready" all_ready

# pod name, uid, pod-template-hash, restarts — and the ReplicaSets — of every agent.
state() {
  kc -n "$NS" get pods -l app.kubernetes.io/name=caravan-agent -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.uid} {.metadata.labels.pod-template-hash} {.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort
  kc -n "$NS" get rs -l app.kubernetes.io/name=caravan-agent -o jsonpath='{range .items[*]}rs {.metadata.name}{"\n"}{end}' | sort
}
before=$(state)
tlog "before the upgrade:"$'\n'"$before"
old_ops=$(kc -n "$SYS_NS" get pods -l app.kubernetes.io/name=caravan-operator -o jsonpath='{.items[*].metadata.name}')

# A new operator image: the same binary under a new tag is a new image to Kubernetes.
"${CTR[@]}" images rm docker.io/caravan/operator:dev-next >/dev/null 2>&1 || true
"${CTR[@]}" images tag docker.io/caravan/operator:dev docker.io/caravan/operator:dev-next >/dev/null
tlog "helm upgrade: operator.image.tag=dev-next, logLevel debug, a pod annotation"
"$HELM" upgrade "$RELEASE" "$ROOT/charts/caravan" -n "$SYS_NS" -f "$values" \
  --set operator.image.tag=dev-next --set operator.logLevel=debug --set operator.podAnnotations.upgraded=yes >/dev/null
new_ops_lead() {
  local holder
  kc -n "$SYS_NS" rollout status deployment/caravan-operator --timeout=5s >/dev/null 2>&1 || return 1
  holder=$(kc -n "$SYS_NS" get lease caravan-operator -o jsonpath='{.spec.holderIdentity}')
  [[ -n "$holder" && " $old_ops " != *" $holder "* ]] &&
    [[ "$(kc -n "$SYS_NS" get pod "$holder" -o jsonpath='{.spec.containers[0].image}')" == *:dev-next ]]
}
check "the upgraded operator (image :dev-next) rolled out and leads" wait_for 240 "new leader" new_ops_lead
leader=$(kc -n "$SYS_NS" get lease caravan-operator -o jsonpath='{.spec.holderIdentity}')
for a in u1 u2 u3; do kc -n "$NS" annotate agent "$a" caravan.dev/touched="$(date +%s)" --overwrite >/dev/null; done
reconciled() { # the new leader reconciled at least the three Agents successfully
  local n
  n=$(kc get --raw "/api/v1/namespaces/$SYS_NS/pods/$leader:8080/proxy/metrics" 2>/dev/null |
    awk '/^caravan_operator_reconciles_total\{.*result="ok"/ {s+=$2} END {print s+0}')
  ((n >= 3))
}
check "the new leader reconciled every Agent" wait_for 120 "reconciles" reconciled
sleep 10 # anything the reconciles changed would now be rolling
after=$(state)
tlog "after the upgrade:"$'\n'"$after"
check "no agent pod restarted, same pod-template hashes, no new ReplicaSet" test "$before" == "$after"
check "the agents' Deployments carry the operator version label" \
  bash -c "[[ -n \$(kubectl -n $NS get deploy caravan-u1 -o jsonpath='{.metadata.labels.app\.kubernetes\.io/version}') ]]"

# Control: a chart change of the agents' desired state rolls them.
tlog "control: helm upgrade --set agent.logFormat=json must roll every agent"
"$HELM" upgrade "$RELEASE" "$ROOT/charts/caravan" -n "$SYS_NS" -f "$values" \
  --set operator.image.tag=dev-next --set agent.logFormat=json >/dev/null
rolled() {
  local a
  for a in u1 u2 u3; do
    [[ "$(kc -n "$NS" get deploy "caravan-$a" -o jsonpath='{.spec.template.spec.containers[0].command}')" == *--log-format* ]] || return 1
    [[ "$(kc -n "$NS" get agent "$a" -o jsonpath='{.status.phase}')" == Ready ]] || return 1
  done
  [[ "$(state)" != "$before" ]]
}
check "control: agent.logFormat=json rolls every agent" wait_for 240 "json roll" rolled
json_logs() {
  kc -n "$NS" logs deploy/caravan-u1 2>/dev/null | head -1 | python3 -c 'import json,sys; json.loads(sys.stdin.readline())'
}
check "control: the agent now logs JSON lines" wait_for 60 "json logs" json_logs

echo "upgrade: $PASS passed, $FAIL failed"
((FAIL == 0))
