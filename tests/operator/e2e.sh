#!/usr/bin/env bash
# End-to-end test of the operator on a real cluster (the local one from
# tests/cluster/up.sh, or any cluster in KUBECONFIG):
#   helm install the chart → apply examples/ → both agents Ready with ids →
#   a spec change rolls the Deployment → bad inputs end in the right condition
#   and heal when fixed → the operator restarted mid-way converges without
#   duplicates → deleting an Agent garbage-collects every child.
#
# Needs the images caravan/operator:dev and caravan/agent:dev in the node
# (tests/cluster/images.sh operator agent). Without a reachable cluster it
# prints SKIP and exits 0.
#
# Env: KUBECONFIG (default target/cluster/kubeconfig), HELM (default
# tests/cluster/helm, else helm), CARAVAN_KEEP=1 keeps what it made.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${KUBECONFIG:=$ROOT/target/cluster/kubeconfig}"
export KUBECONFIG
RELEASE=caravan
SYS_NS=caravan-system
BAD_NS=caravan-e2e-bad
RESTART_NS=caravan-e2e-restart
PASS=0
FAIL=0

# kc, wait_for and the log line come from the shared cluster helpers.
CARAVAN_LOG_TAG=e2e
# shellcheck source=tests/cluster/lib.sh
source "$ROOT/tests/cluster/lib.sh"
log() { tlog "$@"; }

if [[ ! -f "$KUBECONFIG" ]] || ! kc version >/dev/null 2>&1; then
  echo "SKIP: operator e2e: no reachable cluster (KUBECONFIG=$KUBECONFIG); run tests/cluster/up.sh first"
  exit 0
fi
if [[ -z "${HELM:-}" ]]; then
  if [[ -x "$ROOT/tests/cluster/helm" ]]; then HELM="$ROOT/tests/cluster/helm"; else HELM=helm; fi
fi

check() { # NAME COMMAND... — runs one check, counts it.
  local name="$1"
  shift
  if "$@"; then
    log "PASS $name"
    PASS=$((PASS + 1))
  else
    log "FAIL $name"
    FAIL=$((FAIL + 1))
  fi
}

jp() { kc "$@" 2>/dev/null; }
phase() { jp -n "$1" get agent "$2" -o jsonpath='{.status.phase}'; }
cond_reason() { jp -n "$1" get agent "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].reason}"; }
agent_ready() { [[ "$(phase "$1" "$2")" == Ready ]]; }
agent_reason() { [[ "$(cond_reason "$1" "$2" Degraded)" == "$3" ]]; }
has_event() { # NS REASON
  kc -n "$1" get events.events.k8s.io -o jsonpath='{range .items[*]}{.reason}{"\n"}{end}' 2>/dev/null | grep -qx "$2"
}
children_count() { # NS AGENT — objects labelled for the agent, of every child kind
  kc -n "$1" get deployments,configmaps,services,networkpolicies,secrets \
    -l "caravan.dev/agent=$2" --no-headers 2>/dev/null | grep -c . || true
}
# A pod of the agent Running and Ready, not being deleted (`kubectl wait -l`
# would wait for every pod the label matches, one being replaced too).
pod_ready() { # NS AGENT
  kc -n "$1" get pods -l "caravan.dev/agent=$2" --field-selector=status.phase=Running \
    -o jsonpath='{range .items[*]}{.metadata.deletionTimestamp}|{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    grep -qx '|True'
}
operator_restarts() {
  kc -n "$SYS_NS" get pods -l app.kubernetes.io/name=caravan-operator \
    -o jsonpath='{range .items[*]}{.status.containerStatuses[0].restartCount}{"\n"}{end}' | awk '{s+=$1} END {print s+0}'
}

cleanup() {
  [[ "${CARAVAN_KEEP:-0}" == 1 ]] && return
  log "cleaning up"
  kc delete namespace tenant-alice tenant-bob "$BAD_NS" "$RESTART_NS" --wait=false >/dev/null 2>&1 || true
  "$HELM" uninstall "$RELEASE" -n "$SYS_NS" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ------------------------------------------------------------------ install
log "installing the chart (release $RELEASE in $SYS_NS) with $HELM"
clear_namespaces tenant-alice tenant-bob "$BAD_NS" "$RESTART_NS"
if [[ "$(kc get ns "$SYS_NS" -o jsonpath='{.status.phase}' 2>/dev/null)" == Terminating ]]; then
  log "waiting for namespace $SYS_NS to finish terminating"
  kc wait --for=delete "namespace/$SYS_NS" --timeout=180s >/dev/null 2>&1 || true
fi
kc create namespace "$SYS_NS" >/dev/null 2>&1 || true
# The CRDs are templates of the chart (helm upgrade updates them; without CEL
# rules on API servers before 1.25). CRDs left by an older chart (crds/, no
# helm ownership) are adopted with --take-ownership.
"$HELM" upgrade --install --take-ownership "$RELEASE" "$ROOT/charts/caravan" -n "$SYS_NS" \
  -f "$ROOT/examples/provider/values.yaml" >/dev/null
check "operator Deployment becomes available" \
  kc -n "$SYS_NS" wait deployment/caravan-operator --for=condition=Available --timeout=180s
check "a leader holds the Lease" wait_for 60 "lease holder" \
  bash -c "kubectl -n $SYS_NS get lease caravan-operator -o jsonpath='{.spec.holderIdentity}' | grep -q caravan-operator"

# ------------------------------------------------------------------ examples
log "applying examples/tenant-alice.yaml and examples/tenant-bob.yaml"
kc apply -f "$ROOT/examples/tenant-alice.yaml" -f "$ROOT/examples/tenant-bob.yaml" >/dev/null
for t in alice bob; do
  check "agent $t Ready" wait_for 240 "agent $t Ready" agent_ready "tenant-$t" "$t"
  check "agent $t pod Running and Ready" wait_for 60 "agent $t pod Ready" pod_ready "tenant-$t" "$t"
  id=$(jp -n "tenant-$t" get agent "$t" -o jsonpath='{.status.agentId}')
  log "agent $t id: $id endpoint: $(jp -n "tenant-$t" get agent "$t" -o jsonpath='{.status.endpoint}')"
  check "agent $t reports a cv1 id" bash -c "[[ '$id' =~ ^cv1(-[a-z2-7]{8}){7}$ ]]"
  logs=$(kc -n "tenant-$t" logs "deploy/caravan-$t" 2>/dev/null || true)
  if grep -q "agent running" <<<"$logs"; then
    check "agent $t process runs with the id in its status" grep -q -- "$id" <<<"$logs"
  else
    log "SKIP agent $t id in the agent's log (the image is not the real caravan-agent)"
  fi
  check "agent $t has all five children" bash -c "[[ \$(kubectl -n tenant-$t get deployments,configmaps,services,networkpolicies,secrets -l caravan.dev/agent=$t --no-headers | wc -l) == 5 ]]"
  check "agent $t identity Secret is immutable" \
    bash -c "[[ \$(kubectl -n tenant-$t get secret caravan-$t-identity -o jsonpath='{.immutable}') == true ]]"
  pod_json=$(kc -n "tenant-$t" get pod -l "caravan.dev/agent=$t" -o json)
  check "agent $t pod is locked down" python3 - "$pod_json" <<'PY'
import json, sys
pod = json.loads(sys.argv[1])["items"][0]["spec"]
c = pod["containers"][0]
sc = c["securityContext"]
assert pod["automountServiceAccountToken"] is False
assert pod["securityContext"]["runAsNonRoot"] is True
assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
assert c["resources"]["limits"] and c["resources"]["requests"]
ro = {m["mountPath"]: m.get("readOnly", False) for m in c["volumeMounts"]}
assert ro["/var/run/caravan/identity"] and ro["/var/run/caravan/storage"] and ro["/etc/caravan"]
assert not any(v.get("projected") for v in pod["volumes"]), "no service-account token volume"
PY
done
check "no Warning events from the operator for the healthy tenants" \
  bash -c "! kubectl get events.events.k8s.io -n tenant-alice -o jsonpath='{range .items[*]}{.reportingController}/{.type}{\"\n\"}{end}' | grep -qx caravan-operator/Warning"

# ------------------------------------------------------------------ spec change rolls
log "changing alice's logLevel: the Deployment must roll"
old_rs=$(kc -n tenant-alice get rs -l caravan.dev/agent=alice -o jsonpath='{.items[*].metadata.name}')
old_id=$(jp -n tenant-alice get agent alice -o jsonpath='{.status.agentId}')
kc -n tenant-alice patch agent alice --type merge -p '{"spec":{"logLevel":"debug"}}' >/dev/null
rolled() {
  [[ "$(kc -n tenant-alice get deploy caravan-alice -o jsonpath='{.spec.template.spec.containers[0].env[0].value}')" == debug ]] &&
    [[ "$(kc -n tenant-alice get rs -l caravan.dev/agent=alice --no-headers | wc -l)" -ge 2 ]] &&
    [[ "$(jp -n tenant-alice get agent alice -o jsonpath='{.status.observedGeneration}')" == \
       "$(jp -n tenant-alice get agent alice -o jsonpath='{.metadata.generation}')" ]] &&
    agent_ready tenant-alice alice
}
check "spec change rolls a new ReplicaSet and the agent is Ready again" wait_for 180 "rollout" rolled
check "the agent id survives the roll" \
  bash -c "[[ \$(kubectl -n tenant-alice get agent alice -o jsonpath='{.status.agentId}') == '$old_id' ]]"
log "old ReplicaSets: $old_rs; now: $(kc -n tenant-alice get rs -l caravan.dev/agent=alice -o jsonpath='{.items[*].metadata.name}')"

# ------------------------------------------------------------------ bad input
log "bad inputs in $BAD_NS"
kc create namespace "$BAD_NS" >/dev/null
kc -n "$BAD_NS" apply -f - >/dev/null <<'YAML'
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: missing-secret}
spec:
  storage: {scheme: fs, secretRef: {name: not-there-yet}}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: other-namespace}
spec:
  storage: {scheme: fs, secretRef: {name: alice-storage, namespace: tenant-alice}}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: unknown-scheme}
spec:
  storage: {scheme: ftp}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: malformed-options}
spec:
  storage: {scheme: s3, options: {bucket: b, secret_access_key: "oops-in-the-spec"}}
YAML
check "missing Secret → Degraded/SecretNotFound" wait_for 60 "SecretNotFound" agent_reason "$BAD_NS" missing-secret SecretNotFound
check "Secret in another namespace → Degraded/SecretOutsideNamespace" wait_for 60 "SecretOutsideNamespace" agent_reason "$BAD_NS" other-namespace SecretOutsideNamespace
check "unknown scheme → Degraded/UnknownStorageScheme" wait_for 60 "UnknownStorageScheme" agent_reason "$BAD_NS" unknown-scheme UnknownStorageScheme
check "secret in options → Degraded/InvalidOptions" wait_for 60 "InvalidOptions" agent_reason "$BAD_NS" malformed-options InvalidOptions
for r in SecretNotFound SecretOutsideNamespace UnknownStorageScheme InvalidOptions; do
  check "Warning Event $r" wait_for 30 "event $r" has_event "$BAD_NS" "$r"
done
check "bad Agents made no Deployment" bash -c "[[ \$(kubectl -n $BAD_NS get deploy --no-headers 2>/dev/null | wc -l) == 0 ]]"
check "the secret option never reached an Event or a status" \
  bash -c "! { kubectl -n $BAD_NS get events.events.k8s.io -o yaml; kubectl -n $BAD_NS get agents -o jsonpath='{.items[*].status}'; } | grep -q oops-in-the-spec"
# Issue 10: a tenant cannot reach the node's cloud identity.
kc -n "$BAD_NS" apply -f - >/dev/null <<'YAML'
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: node-role}
spec:
  storage: {scheme: s3, options: {bucket: b, region: us-east-1, role_arn: "arn:aws:iam::1:role/node"}}
YAML
check "role_arn (node credentials) → Degraded/InvalidOptions" wait_for 60 "node-role InvalidOptions" agent_reason "$BAD_NS" node-role InvalidOptions
kc -n "$BAD_NS" delete agent node-role --wait=false >/dev/null
# A misspelt option passes the operator's checks (it may be any OpenDAL
# option) but the agent refuses to start on it: its crash loop is reported
# with the agent's own words, not as a rollout that never ends.
t0=$SECONDS
kc -n "$BAD_NS" apply -f - >/dev/null <<'YAML'
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: misspelt-option}
spec:
  storage: {scheme: fs, options: {root: /data, atomic_write_dri: /data/.tmp}}
YAML
degraded_message() { jp -n "$1" get agent "$2" -o jsonpath='{.status.conditions[?(@.type=="Degraded")].message}'; }
crash_named() { agent_reason "$BAD_NS" misspelt-option AgentCrashing && degraded_message "$BAD_NS" misspelt-option | grep -q 'no option named `atomic_write_dri`'; }
check "misspelt storage option → Degraded/AgentCrashing naming it" wait_for 150 "misspelt-option AgentCrashing" crash_named
log "the crash loop was reported $((SECONDS - t0)) s after the Agent was applied"
check "Warning Event AgentCrashing" wait_for 30 "event AgentCrashing" has_event "$BAD_NS" AgentCrashing
# Storage that does not answer (a wrong endpoint): the agent retries it for
# 10 minutes, then exits. Meanwhile the Agent says so with the agent's own
# words (the storage's error), not "waiting for the agent pod".
t0=$SECONDS
kc -n "$BAD_NS" apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Secret
metadata: {name: unreachable-s3}
stringData: {access_key_id: k, secret_access_key: s}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: unreachable-storage}
spec:
  storage:
    scheme: s3
    options: {bucket: b, region: us-east-1, endpoint: "http://127.0.0.1:9"}
    secretRef: {name: unreachable-s3}
YAML
unreachable_said() { agent_reason "$BAD_NS" unreachable-storage StorageUnreachable && degraded_message "$BAD_NS" unreachable-storage | grep -q 'waiting for its storage, not reachable'; }
check "storage that does not answer → Degraded/StorageUnreachable in the agent's words" wait_for 180 "unreachable-storage StorageUnreachable" unreachable_said
log "storage that does not answer was reported $((SECONDS - t0)) s after the Agent was applied"
check "Warning Event StorageUnreachable" wait_for 30 "event StorageUnreachable" has_event "$BAD_NS" StorageUnreachable
log "unreachable storage: $(degraded_message "$BAD_NS" unreachable-storage | cut -c1-300)"
check "agent pods' egress excludes the metadata service, admin ports only from operator pods" \
  python3 - "$(kubectl -n tenant-alice get networkpolicy -l caravan.dev/agent=alice -o json)" <<'PY'
import json, sys
np = json.loads(sys.argv[1])["items"][0]["spec"]
assert "Egress" in np["policyTypes"], np["policyTypes"]
blocks = [p["ipBlock"] for r in np["egress"] for p in r.get("to", []) if "ipBlock" in p]
assert blocks and all("169.254.0.0/16" in b.get("except", []) for b in blocks if b["cidr"] == "0.0.0.0/0"), blocks
admin = np["ingress"][1]["from"][0]
assert admin["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "caravan-operator", admin
PY
log "fixing the inputs: the Agents must heal"
kc -n "$BAD_NS" create secret generic not-there-yet --from-literal=atomic_write_dir=/data/.tmp >/dev/null
kc -n "$BAD_NS" patch agent unknown-scheme --type merge -p '{"spec":{"storage":{"scheme":"fs"}}}' >/dev/null
kc -n "$BAD_NS" patch agent other-namespace --type json -p '[{"op":"remove","path":"/spec/storage/secretRef/namespace"},{"op":"replace","path":"/spec/storage/secretRef/name","value":"not-there-yet"}]' >/dev/null
kc -n "$BAD_NS" patch agent malformed-options --type merge -p '{"spec":{"storage":{"scheme":"fs","options":{"bucket":null,"secret_access_key":null}}}}' >/dev/null
kc -n "$BAD_NS" patch agent misspelt-option --type merge -p '{"spec":{"storage":{"options":{"atomic_write_dri":null}}}}' >/dev/null
for a in missing-secret other-namespace unknown-scheme malformed-options misspelt-option; do
  check "$a heals to Ready" wait_for 180 "$a Ready" agent_ready "$BAD_NS" "$a"
done
# Events are written just after the status that causes them: wait (bounded).
check "Recovered Event" wait_for 30 "a Recovered Event" has_event "$BAD_NS" Recovered
restarts=$(operator_restarts)
check "operator never restarted (no crash loop; restarts=$restarts)" test "$restarts" == 0

# ------------------------------------------------------------------ per-tenant caps
# The examples' ResourceQuota counts the tenant's Caravan objects, and a
# quota refuses one more than it allows before the operator ever sees it.
# The quota controller counts a custom resource only once its discovery
# (every 30 s) has found the CRD; a quota made before that, as the example's
# is (applied with the CRDs just installed), is counted again only at its
# full resync (5 min). So when the example's quota has not counted alice
# yet, a fresh quota with the same key, made now, must count her at once.
agents_counted() {
  local used='{.status.used.count/agents\.caravan\.dev}'
  [[ "$(jp -n tenant-alice get resourcequota caravan-objects -o jsonpath="$used")" == 1 ]] && return 0
  kc -n tenant-alice delete resourcequota caravan-probe --ignore-not-found >/dev/null 2>&1
  kc -n tenant-alice create quota caravan-probe --hard=count/agents.caravan.dev=100 >/dev/null 2>&1
  sleep 3
  [[ "$(jp -n tenant-alice get resourcequota caravan-probe -o jsonpath="$used")" == 1 ]]
}
check "the example tenant quota counts Agents (alice: 1)" wait_for 120 "quota used" agents_counted
kc -n tenant-alice delete resourcequota caravan-probe --ignore-not-found >/dev/null 2>&1
kc -n "$BAD_NS" create quota no-grants --hard=count/trustgrants.caravan.dev=0 >/dev/null
quota_counted() { [[ -n "$(jp -n "$BAD_NS" get resourcequota no-grants -o jsonpath='{.status.hard}')" ]]; }
grant_refused() {
  local out
  wait_for 30 "quota no-grants counted" quota_counted || return 1
  local subject
  subject=$(jp -n tenant-bob get agent bob -o jsonpath='{.status.agentId}')
  if out=$(kc -n "$BAD_NS" create -f - 2>&1 <<YAML
apiVersion: caravan.dev/v1alpha1
kind: TrustGrant
metadata: {name: over-quota}
spec: {issuer: missing-secret, subject: "$subject", depth: 0}
YAML
  ); then
    log "created despite the quota: $out"
    return 1
  fi
  grep -q "exceeded quota" <<<"$out" || { log "refused for another reason: $out"; return 1; }
}
check "a quota of 0 TrustGrants refuses one (exceeded quota)" grant_refused

# ------------------------------------------------------------------ restart mid-way
log "restart: 6 Agents applied, operator leader killed mid-way"
kc create namespace "$RESTART_NS" >/dev/null
kc -n "$RESTART_NS" create secret generic storage --from-literal=atomic_write_dir=/data/.tmp >/dev/null
for i in 1 2 3 4 5 6; do
  printf -- '---\napiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: r%s}\nspec:\n  storage: {scheme: fs, secretRef: {name: storage}}\n' "$i"
done | kc -n "$RESTART_NS" apply -f - >/dev/null
sleep 0.5
leader=$(kc -n "$SYS_NS" get lease caravan-operator -o jsonpath='{.spec.holderIdentity}')
log "deleting leader pod $leader"
kc -n "$SYS_NS" delete pod "$leader" --grace-period=1 --wait=false >/dev/null 2>&1 || true
all_ready() {
  local i
  for i in 1 2 3 4 5 6; do agent_ready "$RESTART_NS" "r$i" || return 1; done
}
check "all six Agents Ready after the restart" wait_for 300 "restart convergence" all_ready
no_dupes() {
  local i ids
  for i in 1 2 3 4 5 6; do
    [[ $(children_count "$RESTART_NS" "r$i") == 5 ]] || return 1
    [[ $(kc -n "$RESTART_NS" get rs -l "caravan.dev/agent=r$i" --no-headers | wc -l) == 1 ]] || return 1
  done
  ids=$(kc -n "$RESTART_NS" get agents -o jsonpath='{range .items[*]}{.status.agentId}{"\n"}{end}' | sort -u | grep -c .)
  [[ "$ids" == 6 ]]
}
check "exactly one of each child, one ReplicaSet, six distinct ids" no_dupes
check "a new leader took over" bash -c "[[ \$(kubectl -n $SYS_NS get lease caravan-operator -o jsonpath='{.spec.holderIdentity}') != '$leader' ]]"

# ------------------------------------------------------------------ kept identity
# spec.keepIdentity: the identity Secret has no owner, outlives its Agent,
# and an Agent of the same name created later takes it up (same id, an
# IdentityReused Event).
keeper() {
  printf 'apiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: keeper}\nspec:\n  keepIdentity: true\n  storage: {scheme: fs, secretRef: {name: storage}}\n' |
    kc -n "$RESTART_NS" apply -f - >/dev/null
}
keeper
check "an Agent keeping its identity gets Ready" wait_for 180 "keeper Ready" agent_ready "$RESTART_NS" keeper
kept_id=$(jp -n "$RESTART_NS" get agent keeper -o jsonpath='{.status.agentId}')
kc -n "$RESTART_NS" delete agent keeper --wait=true --timeout=60s >/dev/null
keeper_gone() { [[ $(kc -n "$RESTART_NS" get deployments -l caravan.dev/agent=keeper --no-headers 2>/dev/null | wc -l) == 0 ]]; }
check "its other children are collected" wait_for 120 "keeper GC" keeper_gone
check "its identity Secret stays, owned by nobody" \
  bash -c "[[ \$(kubectl -n $RESTART_NS get secret caravan-keeper-identity -o jsonpath='{.metadata.ownerReferences}') == '' ]]"
keeper
check "an Agent of the same name created again gets Ready" wait_for 180 "keeper Ready again" agent_ready "$RESTART_NS" keeper
check "with the same agent id ($kept_id)" \
  bash -c "[[ -n '$kept_id' && \$(kubectl -n $RESTART_NS get agent keeper -o jsonpath='{.status.agentId}') == '$kept_id' ]]"
check "and an IdentityReused Event" has_event "$RESTART_NS" IdentityReused

# ------------------------------------------------------------------ delete → GC
log "deleting Agent bob: every child must be garbage-collected"
kc -n tenant-bob delete agent bob --wait=true --timeout=60s >/dev/null
gone() { [[ $(children_count tenant-bob bob) == 0 ]] && [[ $(kc -n tenant-bob get pods -l caravan.dev/agent=bob --no-headers 2>/dev/null | wc -l) == 0 ]]; }
check "bob's Deployment, ConfigMap, Service, NetworkPolicy, Secret and pod are gone" wait_for 120 "garbage collection" gone
check "the tenant's own storage Secret is untouched" kc -n tenant-bob get secret bob-storage

echo "operator e2e: $PASS passed, $FAIL failed"
echo "$PASS passed, $FAIL failed"
((FAIL == 0))
