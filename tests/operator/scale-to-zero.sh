#!/usr/bin/env bash
# Scale to zero end to end on a real cluster and real S3 (moto bound to the
# node address, reachable from pods):
#   helm install (repository on) → bob (always on) and erin from
#   examples/scale-to-zero.yaml (S3, scaleToZero with idleAfter 20s, her
#   Share publishing photos/ to bob) → bob subscribes with the ticket from
#   erin's Share status and holds every object →
#   1. idle: erin's Deployment goes to 0 replicas, no pod, phase Sleeping,
#      Awake=False/Idle, wakeAt = her next rescan, a Sleeping Event; her
#      Share stays Ready and bob's is not Degraded;
#   2. a Share change (and an edited file) wakes her: WokenUp/ShareChanged,
#      a Ready pod, version 2 published and fetched by bob, then asleep again;
#   3. a new subscribe Share of bob wakes her (FetchNeedsPublisher): bob
#      fetches everything into a second folder, then she sleeps again.
# Prints the figures (seconds to sleep after the last fetch, seconds from a
# change to a Ready pod, to the fetched version).
#
# To extend (offline seeding, after it lands): CARAVAN_STZ_OFFLINE=1 sets
# offlineSeeding on erin's Share and, in step 3, requires that erin stays
# asleep (no pod) while bob's new Share completes from her bucket.
#
# Needs the images (tests/cluster/images.sh) and the moto venv
# (tests/s3/moto.sh creates it). Without a reachable cluster: SKIP.
# Env: KUBECONFIG, HELM, CARAVAN_STZ_MOTO_PORT (9520), CARAVAN_NODE_IP,
# CARAVAN_STZ_IDLE (20s), CARAVAN_STZ_OFFLINE, CARAVAN_KEEP=1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${KUBECONFIG:=$ROOT/target/cluster/kubeconfig}"
export KUBECONFIG
RELEASE=caravan
SYS_NS=caravan-system
NODE_IP="${CARAVAN_NODE_IP:-10.231.0.1}"
MOTO_PORT="${CARAVAN_STZ_MOTO_PORT:-9520}"
S3="http://$NODE_IP:$MOTO_PORT"
IDLE="${CARAVAN_STZ_IDLE:-20s}"
OFFLINE="${CARAVAN_STZ_OFFLINE:-0}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caravan"
VENV="$CACHE/venv-moto"
PASS=0
FAIL=0
T0=$SECONDS

CARAVAN_LOG_TAG=scale-to-zero
# shellcheck source=tests/cluster/lib.sh
source "$ROOT/tests/cluster/lib.sh"
log() { tlog "$@"; }

if [[ ! -f "$KUBECONFIG" ]] || ! kc version >/dev/null 2>&1; then
  echo "SKIP: scale-to-zero e2e: no reachable cluster (KUBECONFIG=$KUBECONFIG)"
  exit 0
fi
if [[ -z "${HELM:-}" ]]; then
  if [[ -x "$ROOT/tests/cluster/helm" ]]; then HELM="$ROOT/tests/cluster/helm"; else HELM=helm; fi
fi

check() {
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
agent_field() { jp -n "tenant-$1" get agent "$1" -o jsonpath="{$2}"; }
awake() { agent_field "$1" '.status.conditions[?(@.type=="Awake")].status'; }
share_field() { jp -n "tenant-$1" get share "$2" -o jsonpath="{$3}"; }
share_ready_at() { # TENANT SHARE VERSION
  [[ "$(share_field "$1" "$2" .status.phase)" == Ready && "$(share_field "$1" "$2" .status.version)" == "$3" ]]
}
pods_of() { kubectl -n "tenant-$1" get pods -l "caravan.dev/agent=$1" -o name 2>/dev/null | wc -l; }
ready_pod() { [[ "$(kubectl -n "tenant-$1" get pods -l "caravan.dev/agent=$1" -o jsonpath='{.items[*].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; }
asleep() { # TENANT: status Sleeping, Deployment at 0, no pod left
  [[ "$(agent_field "$1" .status.phase)" == Sleeping && "$(awake "$1")" == False &&
    "$(jp -n "tenant-$1" get deployment "caravan-$1" -o jsonpath='{.spec.replicas}')" == 0 &&
    "$(pods_of "$1")" == 0 ]]
}
woken() { # TENANT REASONS: a WokenUp Event for one of these reasons (a|b)
  kc -n "tenant-$1" get events.events.k8s.io -o jsonpath='{range .items[?(@.reason=="WokenUp")]}{.note}{"\n"}{end}' 2>/dev/null |
    grep -cE "^($2):" | { read -r n; ((n > 0)); }
}
events_of() { # TENANT REASON: how many such Events
  kc -n "tenant-$1" get events.events.k8s.io -o jsonpath="{range .items[?(@.reason==\"$2\")]}{.reason}{\"\\n\"}{end}" 2>/dev/null | grep -c .
}

s3py() { "$VENV/bin/python" - "$@"; }

MOTO_PID=""
cleanup() {
  [[ "${CARAVAN_KEEP:-0}" == 1 ]] && return
  log "cleaning up"
  for t in erin bob; do
    kc -n "tenant-$t" delete shares,trustgrants --all --wait=false >/dev/null 2>&1 || true
  done
  for t in erin bob; do
    kc -n "tenant-$t" wait shares --all --for=delete --timeout=90s >/dev/null 2>&1 || true
    for o in $(kubectl -n "tenant-$t" get shares,trustgrants -o name 2>/dev/null); do
      kc -n "tenant-$t" patch "$o" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
    done
  done
  kc delete namespace tenant-erin tenant-bob --wait=false >/dev/null 2>&1 || true
  "$HELM" uninstall "$RELEASE" -n "$SYS_NS" >/dev/null 2>&1 || true
  [[ -n "$MOTO_PID" ]] && kill "$MOTO_PID" 2>/dev/null
}
trap cleanup EXIT

# ------------------------------------------------------------------ S3
bash "$ROOT/tests/s3/moto.sh" stop "$MOTO_PORT" >/dev/null 2>&1 || true
bash "$ROOT/tests/s3/moto.sh" start "$MOTO_PORT" >/dev/null 2>&1 && bash "$ROOT/tests/s3/moto.sh" stop "$MOTO_PORT" >/dev/null 2>&1
# (the start/stop above only makes sure the venv exists)
mkdir -p "$ROOT/target"
"$VENV/bin/moto_server" -H "$NODE_IP" -p "$MOTO_PORT" >"$ROOT/target/scale-to-zero-moto.log" 2>&1 &
MOTO_PID=$!
wait_for 30 "moto on $S3" curl -fsS -o /dev/null "$S3/" || { log "moto did not start"; exit 1; }
log "moto on $S3 (pid $MOTO_PID)"

s3py "$S3" <<'PY'
import hashlib, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
for b in ["erin-files", "bob-files"]:
    s3.create_bucket(Bucket=b)
rnd = lambda n, seed: hashlib.shake_256(str(seed).encode()).digest(n)
objs = {f"photos/d{i % 3}/bild-{i}.bin": rnd(700_000 + 1000 * i, i) for i in range(12)}
objs["photos/empty.txt"] = b""
for k, v in objs.items():
    s3.put_object(Bucket="erin-files", Key=k, Body=v)
print(f"{len(objs)} objects, {sum(map(len, objs.values()))} bytes")
PY

# same_tree SRC_BUCKET SRC_PREFIX DST_BUCKET DST_PREFIX: every object equal by SHA-256.
same_tree() {
  s3py "$S3" "$@" <<'PY'
import hashlib, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
def tree(bucket, prefix):
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            k = o["Key"][len(prefix):]
            if k.startswith(".caravan/") or k.endswith("/"):
                continue
            out[k] = hashlib.sha256(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()).hexdigest()
    return out
a, b = tree(sys.argv[2], sys.argv[3]), tree(sys.argv[4], sys.argv[5])
if a != b or not a:
    print(f"differ: {len(a)} vs {len(b)} objects; {sorted(set(a) ^ set(b))[:5]}", file=sys.stderr)
    sys.exit(1)
PY
}
edit_file() { # KEY SEED
  s3py "$S3" "$1" "$2" <<'PY'
import hashlib, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
body = s3.get_object(Bucket="erin-files", Key=sys.argv[2])["Body"].read()
mid = len(body) // 2
s3.put_object(Bucket="erin-files", Key=sys.argv[2], Body=body[:mid] + hashlib.shake_256(sys.argv[3].encode()).digest(4096) + body[mid:])
PY
}

# ------------------------------------------------------------------ install
log "installing the chart with the repository"
clear_namespaces tenant-erin tenant-bob
kc create namespace "$SYS_NS" >/dev/null 2>&1 || true
"$HELM" upgrade --install --take-ownership "$RELEASE" "$ROOT/charts/caravan" -n "$SYS_NS" \
  -f "$ROOT/examples/provider/values.yaml" --set repository.enabled=true >/dev/null
check "operator available" kc -n "$SYS_NS" wait deployment/caravan-operator --for=condition=Available --timeout=180s
check "repository available" kc -n "$SYS_NS" wait deployment/caravan-repository --for=condition=Available --timeout=180s
REPO="http://$(jp -n "$SYS_NS" get service caravan-repository -o jsonpath='{.spec.clusterIP}'):7500"

# ------------------------------------------------------------------ bob (always on)
kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: tenant-bob}
---
apiVersion: v1
kind: Secret
metadata: {name: bob-s3, namespace: tenant-bob}
stringData: {access_key_id: key-bob, secret_access_key: secret-bob}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: bob, namespace: tenant-bob}
spec:
  storage:
    scheme: s3
    options: {bucket: bob-files, region: us-east-1, endpoint: "$S3"}
    secretRef: {name: bob-s3}
  repositories: ["$REPO"]
EOF
check "agent bob Ready" wait_for 240 "bob Ready" bash -c "[[ \$(kubectl -n tenant-bob get agent bob -o jsonpath='{.status.phase}') == Ready ]]"
BOB=$(agent_field bob .status.agentId)

# ------------------------------------------------------------------ erin (the example)
# examples/scale-to-zero.yaml with this cluster's S3, credentials, repository,
# bob as the recipient and a short idleAfter.
offline_line=""
[[ "$OFFLINE" == 1 ]] && offline_line="    offlineSeeding: true"
sed -e "s|AKIA-REPLACE-ME|key-erin|; s|secret_access_key: REPLACE-ME|secret_access_key: secret-erin|" \
  -e "s|region: eu-west-1|region: us-east-1|; s|endpoint: \"https://s3.eu-west-1.amazonaws.com\"|endpoint: \"$S3\"|" \
  -e "s|idleAfter: 15m|idleAfter: $IDLE|; s|cv1-REPLACE-WITH-THE-RECIPIENTS-AGENT-ID|$BOB|" \
  -e "s|^  resources:|  repositories: [\"$REPO\"]\n  resources:|" \
  -e "s|^    rescanInterval: 1h|    rescanInterval: 1h\n$offline_line|" \
  "$ROOT/examples/scale-to-zero.yaml" | kc apply -f - >/dev/null
check "erin's Share published (v1)" wait_for 300 "published" share_ready_at erin photos 1
TICKET=$(share_field erin photos '.status.tickets[0].ticket')
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: from-erin, namespace: tenant-bob}
spec:
  agent: bob
  subscribe: {ticket: "$TICKET", destination: inbox/erin, pollInterval: 5s}
EOF
check "bob fetched v1" wait_for 300 "bob v1" share_ready_at bob from-erin 1
t_fetched=$SECONDS
check "bob holds every object of v1" same_tree erin-files photos/ bob-files inbox/erin/

# ------------------------------------------------------------------ 1. sleep
check "erin sleeps: 0 replicas, no pod, phase Sleeping" wait_for 240 "erin asleep" asleep erin
SLEEP1=$((SECONDS - t_fetched))
log "erin asleep ${SLEEP1} s after bob's fetch (idleAfter $IDLE)"
check "Awake=False with reason Idle" bash -c "[[ \$(kubectl -n tenant-erin get agent erin -o jsonpath='{.status.conditions[?(@.type==\"Awake\")].reason}') == Idle ]]"
check "wakeAt is her next rescan (about 1h ahead)" bash -c \
  "w=\$(kubectl -n tenant-erin get agent erin -o jsonpath='{.status.wakeAt}'); [[ -n \$w ]] && (( \$(date -d \"\$w\" +%s) - \$(date +%s) > 3000 ))"
check "Sleeping Event" bash -c "(( \$(kubectl -n tenant-erin get events.events.k8s.io -o jsonpath='{range .items[?(@.reason==\"Sleeping\")]}x{\"\\n\"}{end}' | grep -c x) >= 1 ))"
check "Agent Degraded=False while asleep" bash -c "[[ \$(kubectl -n tenant-erin get agent erin -o jsonpath='{.status.conditions[?(@.type==\"Degraded\")].status}') == False ]]"
sleep 12 # bob polls (every 5 s) while erin sleeps
check "erin's Share stays Ready while she sleeps" share_ready_at erin photos 1
check "bob's Share is not Degraded while erin sleeps" bash -c \
  "[[ \$(kubectl -n tenant-bob get share from-erin -o jsonpath='{.status.phase}') == Ready ]]"
log "bob's Share while erin sleeps: $(share_field bob from-erin '.status.conditions[?(@.type=="Ready")].reason')"
check "still asleep after bob's polls" asleep erin

# ------------------------------------------------------------------ 2. a Share change wakes her
edit_file photos/d1/bild-1.bin 2
t_wake=$SECONDS
kc -n tenant-erin patch share photos --type merge -p '{"spec":{"publish":{"rescanInterval":"2h"}}}' >/dev/null
check "a Share change wakes erin (WokenUp: ShareChanged)" wait_for 120 "woken" woken erin "ShareChanged|ShareInProgress"
check "erin's pod Ready again" wait_for 240 "pod ready" ready_pod erin
WAKE1=$((SECONDS - t_wake))
log "erin's pod Ready ${WAKE1} s after the Share change"
check "erin publishes v2" wait_for 240 "v2" share_ready_at erin photos 2
check "bob fetches v2" wait_for 240 "bob v2" share_ready_at bob from-erin 2
t_fetched=$SECONDS
FETCH2=$((SECONDS - t_wake))
check "bob holds every object of v2" same_tree erin-files photos/ bob-files inbox/erin/
check "erin sleeps again" wait_for 240 "erin asleep" asleep erin
SLEEP2=$((SECONDS - t_fetched))

# ------------------------------------------------------------------ 3. a subscriber wakes her
before=$(events_of erin WokenUp)
t_sub=$SECONDS
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: again, namespace: tenant-bob}
spec:
  agent: bob
  subscribe: {ticket: "$TICKET", destination: inbox/again, pollInterval: 5s}
EOF
if [[ "$OFFLINE" == 1 ]]; then
  check "bob's new Share completes from erin's bucket" wait_for 300 "bob again" share_ready_at bob again 2
  check "erin stayed asleep (offline seeding)" asleep erin
  check "no WokenUp for the fetch" bash -c "(( \$(kubectl -n tenant-erin get events.events.k8s.io -o jsonpath='{range .items[?(@.reason==\"WokenUp\")]}x{\"\\n\"}{end}' | grep -c x) == $before ))"
else
  check "a new subscriber wakes erin (WokenUp: FetchNeedsPublisher)" wait_for 120 "woken" woken erin FetchNeedsPublisher
  check "bob's new Share completes" wait_for 300 "bob again" share_ready_at bob again 2
  FETCH3=$((SECONDS - t_sub))
  t_fetched=$SECONDS
  check "erin sleeps again after serving it" wait_for 240 "erin asleep" asleep erin
  SLEEP3=$((SECONDS - t_fetched))
fi
check "bob holds every object in the second folder" same_tree erin-files photos/ bob-files inbox/again/
check "operator pods never crash-looped" bash -c \
  "[[ \$(kubectl -n $SYS_NS get pods -l app.kubernetes.io/name=caravan-operator -o jsonpath='{range .items[*]}{.status.containerStatuses[0].restartCount}{\"\\n\"}{end}' | awk '{s+=\$1} END {print s+0}') == 0 ]]"

log "figures: idleAfter $IDLE; asleep ${SLEEP1} s after the first fetch; Share change → pod Ready ${WAKE1} s, → v2 at bob ${FETCH2} s; asleep ${SLEEP2} s after that fetch; new subscriber → fetched ${FETCH3:-n/a} s; asleep ${SLEEP3:-n/a} s after it"
log "scale-to-zero e2e: $PASS passed, $FAIL failed in $((SECONDS - T0)) s"
((FAIL == 0))
