#!/usr/bin/env bash
# shellcheck disable=SC2001
# Smoke test of the local cluster with the project's agent image:
# a Deployment of caravan/agent:dev (strict securityContext) becomes Ready through an
# httpGet readiness probe on :9400/readyz, its logs are readable, `kubectl exec` works,
# the API server reaches the pod (proxy to /metrics), and deleting the Deployment
# garbage-collects its ReplicaSet and Pod. Runs in a fresh namespace, removed afterwards.
#
#   KUBECONFIG=target/cluster/kubeconfig tests/cluster/smoke.sh
#
# Before the real agent binary exists, images.sh builds caravan/agent:dev from a busybox
# stand-in with the same interface (CARAVAN_AGENT_BIN=standin).
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

AGENT_IMAGE="${CARAVAN_AGENT_IMAGE:-caravan/agent:dev}"
# ========================================================================================
# >>> THE AGENT'S COMMAND AND CONFIG. The real agent is started exactly like this:
#     caravan-agent run --config /etc/caravan/agent.toml   (metrics/health on :9400)
# Change AGENT_ARGS / AGENT_CONFIG_TOML when the agent's config format is settled.
AGENT_ARGS="${CARAVAN_SMOKE_AGENT_ARGS:-[\"run\", \"--config\", \"/etc/caravan/agent.toml\"]}"
# The agent's identity key is made by an init container (`caravan-agent keygen`) in an
# emptyDir at /var/lib/caravan, next to the fs storage root; the admin token is a Secret.
AGENT_CONFIG_TOML="${CARAVAN_SMOKE_AGENT_CONFIG:-identity_file = \"/var/lib/caravan/identity.key\"
admin_token_file = \"/etc/caravan/admin/admin.token\"
listen = \"0.0.0.0:7400\"
admin_listen = \"127.0.0.1:7401\"
metrics_listen = \"0.0.0.0:9400\"
advertise = []
repositories = []
state_prefix = \".caravan/\"

[storage]
scheme = \"fs\"

[storage.options]
root = \"/var/lib/caravan/data\"
}"
# A command that must succeed inside the container through `kubectl exec`.
# shellcheck disable=SC2206
EXEC_CMD=(${CARAVAN_SMOKE_EXEC_CMD:-/usr/local/bin/caravan-agent --version})
# ========================================================================================
T0=$(date +%s)
step() { tlog "[$(($(date +%s) - T0))s] $*"; }
fail() { tlog "FAIL: $*"; dump_namespace "$NS"; exit 1; }

fresh_namespace NS smoke
step "applying the agent Deployment in $NS (image $AGENT_IMAGE)"
ADMIN_TOKEN=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
kc -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: caravan-agent-admin
stringData:
  admin.token: "$ADMIN_TOKEN"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: caravan-agent
data:
  agent.toml: |
$(sed 's/^/    /' <<<"$AGENT_CONFIG_TOML")
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: caravan-agent
  labels: {app.kubernetes.io/name: caravan-agent, app.kubernetes.io/part-of: caravan}
spec:
  replicas: 1
  selector:
    matchLabels: {app.kubernetes.io/name: caravan-agent}
  template:
    metadata:
      labels: {app.kubernetes.io/name: caravan-agent, app.kubernetes.io/part-of: caravan}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: 5
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        fsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      initContainers:
      - name: keygen
        image: $AGENT_IMAGE
        imagePullPolicy: Never
        args: ["keygen", "--out", "/var/lib/caravan/identity.key"]
        securityContext: &strict
          allowPrivilegeEscalation: false
          privileged: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
        volumeMounts:
        - {name: state, mountPath: /var/lib/caravan}
      containers:
      - name: agent
        image: $AGENT_IMAGE
        imagePullPolicy: Never
        args: $AGENT_ARGS
        ports:
        - {name: metrics, containerPort: 9400}
        readinessProbe:
          httpGet: {path: /readyz, port: metrics}
          periodSeconds: 2
          failureThreshold: 3
        livenessProbe:
          httpGet: {path: /livez, port: metrics}
          periodSeconds: 10
          failureThreshold: 3
        resources:
          requests: {cpu: 10m, memory: 16Mi}
          limits: {memory: 256Mi}
        securityContext: *strict
        volumeMounts:
        - {name: config, mountPath: /etc/caravan, readOnly: true}
        - {name: admin, mountPath: /etc/caravan/admin, readOnly: true}
        - {name: state, mountPath: /var/lib/caravan}
        - {name: tmp, mountPath: /tmp}
      volumes:
      - name: config
        configMap: {name: caravan-agent}
      - name: admin
        secret: {secretName: caravan-agent-admin, defaultMode: 0440}
      - name: state
        emptyDir: {}
      - name: tmp
        emptyDir: {medium: Memory, sizeLimit: 16Mi}
YAML

step "waiting for the pod to be Ready (readiness: httpGet :9400/readyz)"
# Bounded (CARAVAN_SMOKE_READY_TIMEOUT, default 300 s: a busy 2-core node can be slow);
# fails at once when the image is not in the node's containerd.
ready_deadline=$((SECONDS + ${CARAVAN_SMOKE_READY_TIMEOUT:-300}))
while :; do
  if [[ "$(kc -n "$NS" get deployment caravan-agent -o 'jsonpath={.status.availableReplicas}')" == 1 ]]; then
    break
  fi
  reasons=$(kc -n "$NS" get pods -l app.kubernetes.io/name=caravan-agent \
    -o 'jsonpath={.items[*].status.containerStatuses[*].state.waiting.reason}')
  if [[ "$reasons" == *ErrImageNeverPull* ]]; then
    fail "image $AGENT_IMAGE is not in the node's containerd: run tests/cluster/images.sh first"
  fi
  ((SECONDS < ready_deadline)) ||
    fail "Deployment not available after ${CARAVAN_SMOKE_READY_TIMEOUT:-300}s (waiting: ${reasons:-none})"
  sleep 1
done
POD=$(kc -n "$NS" get pods -l app.kubernetes.io/name=caravan-agent -o jsonpath='{.items[0].metadata.name}')
[[ "$(kc -n "$NS" get pod "$POD" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]] ||
  fail "pod $POD is not Ready"
step "pod $POD Ready at $(kc -n "$NS" get pod "$POD" -o jsonpath='{.status.podIP}')"

step "kubectl logs"
logs=$(kc -n "$NS" logs "$POD")
[[ -n "$logs" ]] || fail "kubectl logs returned nothing"
sed -n 's/^/    | /; 1,10p' <<<"$logs" >&2

step "kubectl exec: ${EXEC_CMD[*]}"
out=$(kc -n "$NS" exec "$POD" -- "${EXEC_CMD[@]}") || fail "kubectl exec failed"
[[ -n "$out" ]] || fail "kubectl exec printed nothing"
tlog "    | $out"

step "API server -> pod network: GET /metrics through the pod proxy"
metrics=$(kc get --raw "/api/v1/namespaces/$NS/pods/$POD:9400/proxy/metrics") ||
  fail "could not reach the pod's :9400/metrics through the API server"
sed -n 's/^/    | /; 1,5p' <<<"$metrics" >&2

# The stand-in image has busybox: check from inside that the strict context is real.
if kc -n "$NS" exec "$POD" -- /bin/busybox true >/dev/null 2>&1; then
  step "inside the container (busybox): uid, capabilities, seccomp, read-only root"
  status=$(kc -n "$NS" exec "$POD" -- /bin/busybox cat /proc/self/status)
  grep -E '^(Uid|Gid|CapEff|CapBnd|Seccomp|NoNewPrivs):' <<<"$status" | sed 's/^/    | /' >&2
  grep -qE '^Uid:\s+65532\s' <<<"$status" || fail "not running as uid 65532"
  grep -qE '^CapEff:\s+0+$' <<<"$status" || fail "effective capabilities are not empty"
  grep -qE '^Seccomp:\s+2$' <<<"$status" || fail "no seccomp filter (RuntimeDefault) in force"
  grep -qE '^NoNewPrivs:\s+1$' <<<"$status" || fail "no_new_privs is not set"
  if kc -n "$NS" exec "$POD" -- /bin/busybox touch /probe-rootfs 2>/dev/null; then
    fail "root filesystem is writable"
  fi
  kc -n "$NS" exec "$POD" -- /bin/busybox touch /tmp/probe || fail "/tmp (emptyDir) is not writable"

  step "Service routing (kube-proxy) from inside the pod, hairpin back to itself"
  kc -n "$NS" expose deployment caravan-agent --name caravan-agent --port 9400 --target-port 9400 >/dev/null
  SVC_IP=$(kc -n "$NS" get service caravan-agent -o jsonpath='{.spec.clusterIP}')
  # (busybox-static's wget segfaults on this Debian build: plain HTTP over nc instead.)
  http_from_pod() { # HOST PORT PATH
    kc -n "$NS" exec "$POD" -- /bin/sh -c \
      "printf 'GET $3 HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 $1 $2 | /bin/busybox head -n 1" |
      grep ' 200 ' >/dev/null
  }
  wait_for 30 "service $SVC_IP:9400 from the pod" http_from_pod "$SVC_IP" 9400 /readyz ||
    fail "service $SVC_IP:9400 not reachable from the pod"
  tlog "    | http://$SVC_IP:9400/readyz OK"
  step "the API server through the 'kubernetes' Service (what an in-cluster operator uses)"
  API_IP=$(kc -n default get service kubernetes -o jsonpath='{.spec.clusterIP}')
  kc -n "$NS" exec "$POD" -- /bin/sh -c "/bin/busybox nc -w 3 $API_IP 443 </dev/null" ||
    fail "$API_IP:443 (kubernetes Service) not reachable from the pod"
  tlog "    | tcp $API_IP:443 OK"
fi

step "deleting the Deployment: its ReplicaSet and Pod must be garbage-collected"
kc -n "$NS" delete deployment caravan-agent --wait=false >/dev/null
gone() { [[ -z "$(kc -n "$NS" get replicasets,pods -l app.kubernetes.io/name=caravan-agent -o name 2>/dev/null)" ]]; }
wait_for 180 "ReplicaSet and Pod garbage-collected" gone || fail "owned objects survived their Deployment"

step "PASS"
