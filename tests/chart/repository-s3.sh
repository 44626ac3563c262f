#!/usr/bin/env bash
# The chart's repository runs durably on S3 (real cluster; run by tests/e2e.sh):
#   moto (S3) on the node's address → helm install with repository.storage.scheme=s3,
#   options and a credentials Secret → three agents on this host use it
#   (announcements, a share moved alice → bob in rounds, grants, a revocation) →
#   the agents stop → every record the repository serves is recorded → its pod
#   is deleted → the new pod serves exactly the same records; then 2 replicas
#   serve the same too. A memory-scheme control shows the check can fail.
# Needs the cluster (KUBECONFIG), caravan/agent:dev in the node and a
# caravan-agent binary on this host (CARAVAN_AGENT_BIN or target/{release,debug}).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tests/cluster/lib.sh
source "$ROOT/tests/cluster/lib.sh"
# shellcheck source=tests/cluster/env.sh
source "$ROOT/tests/cluster/env.sh"
HELM="${HELM:-$ROOT/tests/cluster/helm}"
MOTO_PORT="${CARAVAN_REPO_MOTO_PORT:-9483}"
PASS=0
FAIL=0
PIDS=()
check() {
  local name="$1"
  shift
  if "$@"; then tlog "PASS $name"; PASS=$((PASS + 1)); else tlog "FAIL $name"; FAIL=$((FAIL + 1)); fi
}

if ! kc version >/dev/null 2>&1; then echo "SKIP: repository-s3: no reachable cluster"; exit 0; fi
BIN="${CARAVAN_AGENT_BIN:-}"
for b in "$BIN" "$ROOT/target/release/caravan-agent" "$ROOT/target/debug/caravan-agent"; do
  [[ -n "$b" && -x "$b" ]] && { BIN=$b; break; }
done
[[ -x "$BIN" ]] || { echo "SKIP: repository-s3: no caravan-agent binary on this host"; exit 0; }

WORK=$(mktemp -d /tmp/caravan-repo-s3.XXXXXX)
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_all
  "$HELM" uninstall repo -n "${NS:-none}" >/dev/null 2>&1 || true
  cleanup_namespaces
  [[ "${CARAVAN_KEEP:-0}" == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------- S3 on the node address
bash "$ROOT/tests/s3/moto.sh" start "$MOTO_PORT" >/dev/null   # makes the venv (loopback server)
bash "$ROOT/tests/s3/moto.sh" stop "$MOTO_PORT" >/dev/null
"${XDG_CACHE_HOME:-$HOME/.cache}/caravan/venv-moto/bin/moto_server" -H "$NODE_IP" -p "$MOTO_PORT" \
  >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
S3="http://$NODE_IP:$MOTO_PORT"
wait_for 60 "moto on $S3" curl -fsS -o /dev/null "$S3/" || { tail "$WORK/moto.log" >&2; exit 1; }
curl -fsS -X PUT "$S3/caravan-repo" >/dev/null

fresh_namespace NS repo-s3
kc -n "$NS" create secret generic repo-s3 \
  --from-literal=access_key_id=testing --from-literal=secret_access_key=testing >/dev/null
values="$WORK/values.yaml"
cat >"$values" <<YAML
crds: {enabled: false}
rbac: {create: false}
serviceAccount: {create: false}
metrics: {service: false}
operator: {replicas: 0, image: {tag: dev, pullPolicy: Never, repository: caravan/operator}}
agent: {image: {tag: dev, pullPolicy: Never, repository: caravan/agent}}
repository:
  enabled: true
  storage:
    scheme: s3
    options: {bucket: caravan-repo, endpoint: "$S3", region: us-east-1}
    existingSecret: repo-s3
YAML
tlog "helm install repo (repository on s3 at $S3)"
"$HELM" install repo "$ROOT/charts/caravan" -n "$NS" -f "$values" >/dev/null
repo_ready() { kc -n "$NS" wait pod -l app.kubernetes.io/name=caravan-repository --for=condition=Ready --timeout=5s >/dev/null 2>&1; }
check "repository pod Ready through its /healthz probe" wait_for 180 "repository Ready" repo_ready
pod_ips() { kc -n "$NS" get pods -l app.kubernetes.io/name=caravan-repository --field-selector=status.phase=Running -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}'; }
CLUSTER_IP=$(kc -n "$NS" get svc repo-caravan-repository -o jsonpath='{.spec.clusterIP}')
if curl -fsS -m 5 "http://$CLUSTER_IP:7500/healthz" >/dev/null 2>&1; then
  URL="http://$CLUSTER_IP:7500"
else
  URL="http://$(pod_ips | head -1):7500"
fi
tlog "repository at $URL"

# ---------------------------------------------------------------- records from three agents
for n in alice bob carol; do
  i=$(( ${#PIDS[@]} ))
  "$BIN" init --dir "$WORK/$n" --listen "127.0.0.1:175${i}1" --admin "127.0.0.1:175${i}2" \
    --metrics "127.0.0.1:175${i}3" >/dev/null
  sed -i "s|^repositories = \[\]|repositories = [\"$URL\"]|; s|^advertise = \[\]|advertise = [\"127.0.0.1:175${i}1\"]|" \
    "$WORK/$n/agent.toml"
  "$BIN" run -c "$WORK/$n/agent.toml" >"$WORK/$n.log" 2>&1 &
  PIDS+=($!)
  echo "http://127.0.0.1:175${i}3/metrics" >>"${CARAVAN_SCRAPE_EXTRA:-/dev/null}"
done
agent_id() { "$BIN" id -c "$WORK/$1/agent.toml"; }
for n in alice bob carol; do wait_for 30 "$n admin API" "$BIN" status -c "$WORK/$n/agent.toml"; done
ALICE=$(agent_id alice) BOB=$(agent_id bob) CAROL=$(agent_id carol)
"$BIN" trust grant -c "$WORK/alice/agent.toml" "$BOB" --depth 1 >/dev/null
"$BIN" trust grant -c "$WORK/bob/agent.toml" "$CAROL" --depth 0 >/dev/null
"$BIN" trust grant -c "$WORK/alice/agent.toml" "$CAROL" --depth 0 >/dev/null
"$BIN" trust revoke -c "$WORK/alice/agent.toml" "$CAROL" >/dev/null
share=""
rounds="${CARAVAN_REPO_ROUNDS:-4}"
for ((r = 1; r <= rounds; r++)); do
  mkdir -p "$WORK/alice/data/photos"
  head -c $((6 << 20)) /dev/urandom >"$WORK/alice/data/photos/round-$r.bin"
  out=$("$BIN" publish -c "$WORK/alice/agent.toml" photos --to "$BOB" ${share:+--share "$share"} --json)
  share=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["share_id"])' <<<"$out")
  ticket=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["tickets"][0][1])' <<<"$out")
  timeout 120 "$BIN" fetch -c "$WORK/bob/agent.toml" "$ticket" --dest photos >/dev/null 2>&1 ||
    tlog "round $r: fetch failed"
  tlog "round $r: $(du -sh "$WORK/bob/data/photos" 2>/dev/null | cut -f1) at bob"
  ((r < rounds)) && sleep "${CARAVAN_REPO_ROUND_PAUSE:-15}"
done
check "bob fetched every round through the repository on s3" \
  cmp -s <(cat "$WORK"/alice/data/photos/*.bin) <(cat "$WORK"/bob/data/photos/*.bin)
stop_all_agents() { # agents only (moto stays)
  local keep=("${PIDS[0]}") p
  for p in "${PIDS[@]:1}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=("${keep[@]}")
}
stop_all_agents

# Everything the repository serves about the three agents, as one digest per look-up.
snapshot() { # BASE_URL
  local base="$1" a path
  for a in "$ALICE" "$BOB" "$CAROL"; do
    for path in "announcements/$a" "grants/by-issuer/$a" "grants/by-subject/$a" "revocations/by-issuer/$a"; do
      printf '%s %s\n' "$path" "$(curl -fsS -m 10 "$base/v1/$path" 2>/dev/null | sha256sum | cut -c1-16)"
    done
  done
  printf 'feed %s\n' "$(curl -fsS -m 10 "$base/v1/revocations?cursor=0&limit=1000" 2>/dev/null | sha256sum | cut -c1-16)"
}
counts() { # BASE_URL → "grants revocations" issued by alice
  python3 - "$1" "$ALICE" <<'PY'
import sys, urllib.request
def frames(url):
    data = urllib.request.urlopen(url, timeout=10).read()
    n, i = 0, 0
    while i + 4 <= len(data):
        i += 4 + int.from_bytes(data[i:i + 4], "big"); n += 1
    return n
base, a = sys.argv[1], sys.argv[2]
print(frames(f"{base}/v1/grants/by-issuer/{a}"), frames(f"{base}/v1/revocations/by-issuer/{a}"))
PY
}
before=$(snapshot "$URL")
read -r grants revs < <(counts "$URL")
tlog "before restart: alice issued $grants unexpired grant(s) and $revs revocation(s); $(grep -c . <<<"$before") look-ups recorded"
check "the repository holds alice's grant and her revocation" test "$grants" -ge 1 -a "$revs" -ge 1

old_pod=$(kc -n "$NS" get pods -l app.kubernetes.io/name=caravan-repository -o jsonpath='{.items[0].metadata.name}')
tlog "deleting repository pod $old_pod"
kc -n "$NS" delete pod "$old_pod" --wait=true --timeout=60s >/dev/null
new_ready() {
  [[ "$(kc -n "$NS" get pods -l app.kubernetes.io/name=caravan-repository -o jsonpath='{.items[*].metadata.name}')" != *"$old_pod"* ]] && repo_ready
}
check "a new repository pod is Ready" wait_for 180 "new repository pod" new_ready
[[ "$URL" == "http://$CLUSTER_IP:7500" ]] || URL="http://$(pod_ips | head -1):7500"
wait_for 30 "repository answers" curl -fsS -m 5 "$URL/healthz" >/dev/null
after=$(snapshot "$URL")
check "after the restart every look-up answers exactly the same records" test "$before" == "$after"
[[ "$before" == "$after" ]] || diff <(echo "$before") <(echo "$after") >&2

tlog "scaling the repository to 2 replicas (shared state in the bucket)"
"$HELM" upgrade repo "$ROOT/charts/caravan" -n "$NS" -f "$values" --set repository.replicas=2 >/dev/null
two_ready() { [[ $(pod_ips | grep -c .) == 2 ]] && repo_ready; }
check "two repository replicas Ready" wait_for 180 "two replicas" two_ready
check "a PodDisruptionBudget guards them" kc -n "$NS" get pdb repo-caravan-repository
same_on_each() {
  local ip
  for ip in $(pod_ips); do [[ "$(snapshot "http://$ip:7500")" == "$before" ]] || return 1; done
}
check "each replica serves the same records" same_on_each

# Control: the same check on the memory scheme loses the records on restart.
tlog "control: memory scheme"
grep -v -e '^  storage:' -e '^    scheme:' -e '^    options:' -e '^    existingSecret:' "$values" >"$WORK/memory.yaml"
"$HELM" upgrade repo "$ROOT/charts/caravan" -n "$NS" -f "$WORK/memory.yaml" >/dev/null
mem_ready() { [[ $(pod_ips | grep -c .) == 1 ]] && repo_ready && [[ "$(kc -n "$NS" get deploy repo-caravan-repository -o jsonpath='{.spec.template.spec.containers[0].command}')" == *memory* ]]; }
if wait_for 180 "memory repository" mem_ready; then
  sleep 2
  check "control: a memory repository after a restart has lost them (the check can fail)" \
    test "$(snapshot "http://$(pod_ips | head -1):7500")" != "$before"
else
  tlog "FAIL control rollout"; FAIL=$((FAIL + 1))
fi

echo "repository-s3: $PASS passed, $FAIL failed"
((FAIL == 0))
