#!/usr/bin/env bash
# Shares and trust grants end to end on a real cluster and real S3 (moto
# bound to the node address, reachable from pods):
#   helm install (repository on) → tenants alice, bob, carol, dave, each an
#   Agent on its own bucket with its own credentials Secret → a generated
#   folder (≥ 64 MiB: nested dirs, an empty file, non-ASCII names, a file
#   over 8 MiB) in alice's bucket → TrustGrants alice→bob (depth 1) and
#   bob→carol (depth 0) → alice publishes to trustedWithinDepth 2 and to dave
#   → bob and carol subscribe by share id + publisher id, dave with the
#   ticket from alice's Share status → every object compared (SHA-256) →
#   an edit reaches all three, moving a small fraction of the bytes, with
#   the operator pod killed mid-way → deleting alice→bob turns bob and carol
#   TrustRevoked, the next version reaches dave only → bad inputs get their
#   condition and heal.
#
# Needs the images (tests/cluster/images.sh) and the moto venv
# (tests/s3/moto.sh creates it). Without a reachable cluster: SKIP.
# Env: KUBECONFIG, HELM, CARAVAN_SHARES_MOTO_PORT (9482), CARAVAN_NODE_IP,
# CARAVAN_SHARES_MIB (64), CARAVAN_KEEP=1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${KUBECONFIG:=$ROOT/target/cluster/kubeconfig}"
export KUBECONFIG
RELEASE=caravan
SYS_NS=caravan-system
TENANTS=(alice bob carol dave)
NODE_IP="${CARAVAN_NODE_IP:-10.231.0.1}"
MOTO_PORT="${CARAVAN_SHARES_MOTO_PORT:-9482}"
S3="http://$NODE_IP:$MOTO_PORT"
MIB="${CARAVAN_SHARES_MIB:-64}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caravan"
VENV="$CACHE/venv-moto"
PASS=0
FAIL=0
T0=$SECONDS

CARAVAN_LOG_TAG=shares-e2e
# shellcheck source=tests/cluster/lib.sh
source "$ROOT/tests/cluster/lib.sh"
log() { tlog "$@"; }

if [[ ! -f "$KUBECONFIG" ]] || ! kc version >/dev/null 2>&1; then
  echo "SKIP: shares e2e: no reachable cluster (KUBECONFIG=$KUBECONFIG)"
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
share_field() { jp -n "tenant-$1" get share "$2" -o jsonpath="{$3}"; }
share_reason() { share_field "$1" "$2" "$(printf '.status.conditions[?(@.type=="%s")].reason' "$3")"; }
share_ready_at() { # TENANT SHARE VERSION
  [[ "$(share_field "$1" "$2" .status.phase)" == Ready && "$(share_field "$1" "$2" .status.version)" == "$3" ]]
}
share_degraded() { # TENANT SHARE REASON
  [[ "$(share_reason "$1" "$2" Degraded)" == "$3" ]]
}
share_progressing() { # TENANT SHARE REASON
  [[ "$(share_reason "$1" "$2" Progressing)" == "$3" ]]
}
grant_field() { jp -n "tenant-$1" get trustgrant "$2" -o jsonpath="{$3}"; }
grant_reason() { jp -n "tenant-$1" get trustgrant "$2" -o jsonpath="$(printf '{.status.conditions[?(@.type=="%s")].reason}' "$3")"; }
has_event() { kc -n "$1" get events.events.k8s.io -o jsonpath='{range .items[*]}{.reason}{"\n"}{end}' 2>/dev/null | grep -qx "$2"; }
agent_ready() { [[ "$(jp -n "tenant-$1" get agent "$1" -o jsonpath='{.status.phase}')" == Ready ]]; }

s3py() { "$VENV/bin/python" - "$@"; }

MOTO_PID=""
cleanup() {
  [[ "${CARAVAN_KEEP:-0}" == 1 ]] && return
  log "cleaning up"
  # Shares and TrustGrants carry finalizers: let the operator release them
  # before it is uninstalled, then strip what is left so no namespace hangs.
  for t in "${TENANTS[@]}"; do
    kc -n "tenant-$t" delete shares,trustgrants --all --wait=false >/dev/null 2>&1 || true
  done
  for t in "${TENANTS[@]}"; do
    kc -n "tenant-$t" wait shares,trustgrants --all --for=delete --timeout=60s >/dev/null 2>&1 || true
    for o in $(kubectl -n "tenant-$t" get shares,trustgrants -o name 2>/dev/null); do
      kc -n "tenant-$t" patch "$o" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
    done
  done
  kc delete namespace "${TENANTS[@]/#/tenant-}" --wait=false >/dev/null 2>&1 || true
  "$HELM" uninstall "$RELEASE" -n "$SYS_NS" >/dev/null 2>&1 || true
  [[ -n "$MOTO_PID" ]] && kill "$MOTO_PID" 2>/dev/null
}
trap cleanup EXIT

# ------------------------------------------------------------------ S3
bash "$ROOT/tests/s3/moto.sh" stop "$MOTO_PORT" >/dev/null 2>&1 || true
bash "$ROOT/tests/s3/moto.sh" start "$MOTO_PORT" >/dev/null 2>&1 && bash "$ROOT/tests/s3/moto.sh" stop "$MOTO_PORT" >/dev/null 2>&1
# (the start/stop above only makes sure the venv exists)
"$VENV/bin/moto_server" -H "$NODE_IP" -p "$MOTO_PORT" >"$ROOT/target/shares-moto.log" 2>&1 &
MOTO_PID=$!
wait_for 30 "moto on $S3" curl -fsS -o /dev/null "$S3/" || { log "moto did not start"; exit 1; }
log "moto on $S3 (pid $MOTO_PID)"

s3py "$S3" "$MIB" <<'PY'
import hashlib, os, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
for b in ["alice-files", "bob-files", "carol-files", "dave-files"]:
    s3.create_bucket(Bucket=b)
mib = int(sys.argv[2])
rnd = lambda n, seed: hashlib.shake_256(str(seed).encode()).digest(n)
objs = {"photos/empty.txt": b"", "photos/big/größer-als-8MiB.bin": rnd(9 << 20, 1)}
left = (mib << 20) - (9 << 20)
i = 0
while left > 0:
    n = min(3 << 20, left)
    objs[f"photos/d{i % 4}/sub{i % 3}/файл-{i}.bin"] = rnd(n, 100 + i)
    left -= n
    i += 1
for k, v in objs.items():
    s3.put_object(Bucket="alice-files", Key=k, Body=v)
print(f"{len(objs)} objects, {sum(map(len, objs.values()))} bytes")
PY

# same_tree SRC_BUCKET SRC_PREFIX DST_BUCKET DST_PREFIX: every object equal by SHA-256.
same_tree() {
  s3py "$S3" "$@" <<'PY'
import hashlib, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
def tree(bucket, prefix):
    out, tok = {}, None
    while True:
        kw = dict(Bucket=bucket, Prefix=prefix)
        if tok: kw["ContinuationToken"] = tok
        r = s3.list_objects_v2(**kw)
        for o in r.get("Contents", []):
            k = o["Key"][len(prefix):]
            if k.startswith(".caravan/") or k.endswith("/"):
                continue
            out[k] = hashlib.sha256(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()).hexdigest()
        if not r.get("IsTruncated"): break
        tok = r["NextContinuationToken"]
    return out
a, b = tree(sys.argv[2], sys.argv[3]), tree(sys.argv[4], sys.argv[5])
if a != b or not a:
    print(f"differ: {len(a)} vs {len(b)} objects; {sorted(set(a) ^ set(b))[:5]}", file=sys.stderr)
    sys.exit(1)
PY
}
not_same_tree() { ! same_tree "$@" 2>/dev/null; }
edit_file() { # KEY SEED
  s3py "$S3" "$1" "$2" <<'PY'
import hashlib, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
body = s3.get_object(Bucket="alice-files", Key=sys.argv[2])["Body"].read()
mid = len(body) // 2
s3.put_object(Bucket="alice-files", Key=sys.argv[2], Body=body[:mid] + hashlib.shake_256(sys.argv[3].encode()).digest(4096) + body[mid:])
PY
}

# ------------------------------------------------------------------ install
log "installing the chart with the repository"
clear_namespaces "${TENANTS[@]/#/tenant-}"
kc create namespace "$SYS_NS" >/dev/null 2>&1 || true
"$HELM" upgrade --install --take-ownership "$RELEASE" "$ROOT/charts/caravan" -n "$SYS_NS" \
  -f "$ROOT/examples/provider/values.yaml" --set repository.enabled=true >/dev/null
check "operator available" kc -n "$SYS_NS" wait deployment/caravan-operator --for=condition=Available --timeout=180s
check "repository available" kc -n "$SYS_NS" wait deployment/caravan-repository --for=condition=Available --timeout=180s
REPO_IP=$(jp -n "$SYS_NS" get service caravan-repository -o jsonpath='{.spec.clusterIP}')
REPO="http://$REPO_IP:7500"
log "repository at $REPO (ClusterIP: the local cluster has no DNS)"

# ------------------------------------------------------------------ tenants
for t in "${TENANTS[@]}"; do
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: tenant-$t}
---
apiVersion: v1
kind: Secret
metadata: {name: $t-s3, namespace: tenant-$t}
stringData: {access_key_id: key-$t, secret_access_key: secret-$t}
---
apiVersion: caravan.dev/v1alpha1
kind: Agent
metadata: {name: $t, namespace: tenant-$t}
spec:
  storage:
    scheme: s3
    options: {bucket: $t-files, region: us-east-1, endpoint: "$S3"}
    secretRef: {name: $t-s3}
  repositories: ["$REPO"]
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {cpu: "1", memory: 256Mi}
EOF
done
for t in "${TENANTS[@]}"; do
  check "agent $t Ready" wait_for 240 "agent $t Ready" agent_ready "$t"
done
declare -A ID
for t in "${TENANTS[@]}"; do
  ID[$t]=$(jp -n "tenant-$t" get agent "$t" -o jsonpath='{.status.agentId}')
  log "agent $t: ${ID[$t]} at $(jp -n "tenant-$t" get agent "$t" -o jsonpath='{.status.addresses}')"
done
check "agents advertise their ClusterIP first" bash -c \
  "kubectl -n tenant-alice get agent alice -o jsonpath='{.status.addresses[0]}' | grep -Eq '^10\\.[0-9.]+:7400$'"

# ------------------------------------------------------------------ grants
# alice→bob is examples/shares/trust-bob.yaml with bob's id filled in.
sed "s/cv1-REPLACE-WITH-BOBS-AGENT-ID/${ID[bob]}/" "$ROOT/examples/shares/trust-bob.yaml" | kc apply -f - >/dev/null
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: TrustGrant
metadata: {name: trust-carol, namespace: tenant-bob}
spec: {issuer: bob, subject: ${ID[carol]}, depth: 0}
EOF
check "grant alice→bob published" wait_for 120 "grant published" \
  bash -c "[[ \$(kubectl -n tenant-alice get trustgrant trust-bob -o jsonpath='{.status.published}') == true ]]"
check "grant bob→carol published" wait_for 120 "grant published" \
  bash -c "[[ \$(kubectl -n tenant-bob get trustgrant trust-carol -o jsonpath='{.status.published}') == true ]]"
GRANT_ID=$(grant_field alice trust-bob .status.grantId)

# ------------------------------------------------------------------ publish
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: photos, namespace: tenant-alice}
spec:
  agent: alice
  publish:
    path: photos/
    recipients: {agentIds: ["${ID[dave]}"], trustedWithinDepth: 2}
    rescanInterval: 10s
EOF
t_pub=$SECONDS
check "alice's Share published (v1)" wait_for 300 "published" share_ready_at alice photos 1
log "published in $((SECONDS - t_pub)) s"
SHARE_ID=$(share_field alice photos .status.shareId)
DAVE_TICKET=$(share_field alice photos '.status.tickets[0].ticket')
check "status has dave's ticket and a keyless ticket" bash -c \
  "[[ -n '$DAVE_TICKET' && -n \"\$(kubectl -n tenant-alice get share photos -o jsonpath='{.status.keylessTicket}')\" ]]"
BYTES_TOTAL=$(share_field alice photos .status.bytesTotal)

# ------------------------------------------------------------------ subscribe
for t in bob carol; do
  kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: from-alice, namespace: tenant-$t}
spec:
  agent: $t
  subscribe: {shareId: "$SHARE_ID", publisher: "${ID[alice]}", destination: inbox/alice, pollInterval: 5s}
EOF
done
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: from-alice, namespace: tenant-dave}
spec:
  agent: dave
  subscribe: {ticket: "$DAVE_TICKET", destination: inbox/alice, pollInterval: 5s}
EOF
t_sub=$SECONDS
for t in bob carol dave; do
  check "$t has v1" wait_for 300 "$t v1" share_ready_at "$t" from-alice 1
  check "$t's bucket equals alice's folder" same_tree alice-files photos/ "$t-files" inbox/alice/
done
log "three subscribers in sync $((SECONDS - t_sub)) s after their Shares"

# ------------------------------------------------------------------ an edit, operator killed
edit_file "photos/d1/sub1/файл-1.bin" edit-1
t_edit=$SECONDS
check "alice publishes v2" wait_for 120 "v2" share_ready_at alice photos 2
victim=$(jp -n "$SYS_NS" get lease caravan-operator -o jsonpath='{.spec.holderIdentity}')
log "killing the leading operator pod $victim mid-way"
kc -n "$SYS_NS" delete pod "$victim" --grace-period=0 --force >/dev/null 2>&1 || true
for t in bob carol dave; do
  check "$t has v2" wait_for 240 "$t v2" share_ready_at "$t" from-alice 2
  check "$t's bucket equals alice's folder (v2)" same_tree alice-files photos/ "$t-files" inbox/alice/
  recv=$(share_field "$t" from-alice .status.bytesReceived)
  log "$t received $recv of $BYTES_TOTAL bytes for v2"
  check "$t received a small fraction for v2" bash -c "(( ${recv:-0} * 10 < $BYTES_TOTAL ))"
done
log "edit propagated in $((SECONDS - t_edit)) s"
check "no duplicate versions (alice still at v2)" share_ready_at alice photos 2
check "the grant was not re-signed" bash -c "[[ \"\$(kubectl -n tenant-alice get trustgrant trust-bob -o jsonpath='{.status.grantId}')\" == '$GRANT_ID' ]]"

# ------------------------------------------------------------------ revocation
kc -n tenant-alice delete trustgrant trust-bob --wait=true --timeout=120s >/dev/null
check "the TrustGrant is gone (revocation published)" bash -c "! kubectl -n tenant-alice get trustgrant trust-bob >/dev/null 2>&1"
check "Revoked event" has_event tenant-alice Revoked
edit_file "photos/d2/sub2/файл-2.bin" edit-2
check "alice publishes v3" wait_for 120 "v3" share_ready_at alice photos 3
check "dave has v3" wait_for 240 "dave v3" share_ready_at dave from-alice 3
check "dave's bucket equals alice's folder (v3)" same_tree alice-files photos/ dave-files inbox/alice/
for t in bob carol; do
  check "$t is TrustRevoked" wait_for 120 "$t revoked" share_degraded "$t" from-alice TrustRevoked
  check "$t keeps v2" bash -c "[[ \$(kubectl -n tenant-$t get share from-alice -o jsonpath='{.status.version}') == 2 ]]"
  check "$t's bucket does not have v3" not_same_tree alice-files photos/ "$t-files" inbox/alice/
done

# ------------------------------------------------------------------ bad input
bad_share() { # NAME YAML-SPEC [TENANT]
  kc apply --validate=false -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: Share
metadata: {name: $1, namespace: tenant-${3:-bob}}
spec:
$2
EOF
}
bad_share no-agent "  agent: nobody
  subscribe: {ticket: \"$DAVE_TICKET\", destination: inbox/alice}" dave
check "missing Agent → AgentNotFound" wait_for 60 "AgentNotFound" share_degraded dave no-agent AgentNotFound
kc -n tenant-dave patch share no-agent --type merge -p '{"spec":{"agent":"dave"}}' >/dev/null
check "… heals when the Agent is named right" wait_for 180 "healed" share_ready_at dave no-agent 3
bad_share both "  agent: bob
  publish: {path: x, recipients: {trustedWithinDepth: 1}}
  subscribe: {shareId: \"$SHARE_ID\", publisher: \"${ID[alice]}\", destination: \"out\"}"
check "publish and subscribe → InvalidSpec" wait_for 60 "InvalidSpec" share_degraded bob both InvalidSpec
bad_share garbage "  agent: bob
  subscribe: {ticket: \"caravan-ticket-v1:AAAA\", destination: g}"
check "garbage ticket → TicketInvalid" wait_for 60 "TicketInvalid" share_degraded bob garbage TicketInvalid
bad_share truncated "  agent: bob
  subscribe: {ticket: \"${DAVE_TICKET:0:60}\", destination: g}"
check "truncated ticket → TicketInvalid" wait_for 60 "TicketInvalid" share_degraded bob truncated TicketInvalid
bad_share stolen "  agent: bob
  subscribe: {ticket: \"$DAVE_TICKET\", destination: s}"
check "ticket for another agent → NotARecipient" wait_for 60 "NotARecipient" share_degraded bob stolen NotARecipient
bad_share escape "  agent: bob
  subscribe: {shareId: \"$SHARE_ID\", publisher: \"${ID[alice]}\", destination: ../x}"
check "destination ../x → InvalidPath" wait_for 60 "InvalidPath" share_degraded bob escape InvalidPath
bad_share absolute "  agent: bob
  publish: {path: /etc, recipients: {trustedWithinDepth: 1}}"
check "absolute path → InvalidPath" wait_for 60 "InvalidPath" share_degraded bob absolute InvalidPath
kc -n tenant-bob patch share escape --type merge -p '{"spec":{"subscribe":{"destination":"healed"}}}' >/dev/null
check "… and heals when fixed (revoked chain: TrustRevoked/NotARecipient, not InvalidPath)" wait_for 120 "healed" \
  bash -c "[[ \"\$(kubectl -n tenant-bob get share escape -o jsonpath='{.status.conditions[?(@.type==\"Degraded\")].reason}')\" != InvalidPath ]]"
id_bad="${ID[carol]%?}$([[ ${ID[carol]: -1} == a ]] && echo b || echo a)"
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: TrustGrant
metadata: {name: bad-subject, namespace: tenant-alice}
spec: {issuer: alice, subject: "$id_bad", depth: 0}
EOF
check "grant with a bad checksum → InvalidSubject" wait_for 60 "InvalidSubject" \
  bash -c "[[ \$(kubectl -n tenant-alice get trustgrant bad-subject -o jsonpath='{.status.conditions[?(@.type==\"Degraded\")].reason}') == InvalidSubject ]]"
check "grant with depth 9 is refused by the API server" bash -c \
  "! kubectl apply -f - >/dev/null 2>&1 <<Y
apiVersion: caravan.dev/v1alpha1
kind: TrustGrant
metadata: {name: too-deep, namespace: tenant-alice}
spec: {issuer: alice, subject: ${ID[carol]}, depth: 9}
Y"
kc apply -f - >/dev/null <<EOF
apiVersion: caravan.dev/v1alpha1
kind: TrustGrant
metadata: {name: early, namespace: tenant-alice}
spec: {issuer: later, subject: "${ID[carol]}", depth: 0}
EOF
check "grant by a missing issuer → IssuerNotFound" wait_for 60 "IssuerNotFound" \
  bash -c "[[ \$(kubectl -n tenant-alice get trustgrant early -o jsonpath='{.status.conditions[?(@.type==\"Degraded\")].reason}') == IssuerNotFound ]]"
kc -n tenant-alice patch trustgrant early --type merge -p '{"spec":{"issuer":"alice"}}' >/dev/null 2>&1 || true
check "operator pods never crash-looped" bash -c \
  "[[ \$(kubectl -n $SYS_NS get pods -l app.kubernetes.io/name=caravan-operator -o jsonpath='{range .items[*]}{.status.containerStatuses[0].restartCount}{\"\\n\"}{end}' | awk '{s+=\$1} END {print s+0}') == 0 ]]"

# ------------------------------------------------------------------ delete
kc -n tenant-alice delete share photos --wait=true --timeout=120s >/dev/null
check "deleting the publish Share completes (finalizer released)" bash -c "! kubectl -n tenant-alice get share photos >/dev/null 2>&1"
check "Stopped event" has_event tenant-alice Stopped

log "shares e2e: $PASS passed, $FAIL failed in $((SECONDS - T0)) s"
((FAIL == 0))
