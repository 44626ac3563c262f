"""Chart tests through real installs (run by tests/chart/run.sh).

`helm template` is not available without the Go helm binary (helm-sdkpy has no
template or dry-run action), so each case installs the chart with
tests/cluster/helm into a bare API server (etcd + kube-apiserver 1.20.2: objects
are validated and stored, no pod runs) and checks the stored objects.
Prints one PASS/FAIL line per check and "chart tests: N passed, M failed".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/caravan"
HELM = os.environ.get("HELM") or str(ROOT / "tests/cluster/helm")
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
PASSED: list[str] = []
FAILED: list[str] = []


def log(msg: str) -> None:
    print(f"[chart] {msg}", file=sys.stderr, flush=True)


def check(name: str, fn: Callable[[], Any]) -> None:
    try:
        ok = fn()
        if ok is False:
            raise AssertionError("returned False")
        PASSED.append(name)
        log(f"PASS {name}")
    except Exception as e:  # noqa: BLE001 — a test harness reports everything
        FAILED.append(name)
        log(f"FAIL {name}: {type(e).__name__}: {e}")


def run(*cmd: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, input=stdin)
    if ok and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {p.stderr.strip()[-800:]}")
    return p


def helm(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    return run(HELM, *args, ok=ok)


def kget(kind: str, ns: str | None = None, name: str | None = None) -> Any:
    cmd = ["kubectl", "get", kind, "-o", "json"]
    if name:
        cmd.insert(3, name)
    cmd += ["-n", ns] if ns else []
    return json.loads(run(*cmd).stdout)


def install(release: str, ns: str, values: dict, chart: Path = CHART, extra: tuple = ()) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
    try:
        helm("upgrade", "--install", release, str(chart), "-n", ns, "--create-namespace", "-f", f.name, *extra)
    finally:
        os.unlink(f.name)


def install_fails(release: str, ns: str, values: dict) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values, f)
    try:
        p = helm("install", release, str(CHART), "-n", ns, "--create-namespace", "-f", f.name, ok=False)
    finally:
        os.unlink(f.name)
    assert p.returncode != 0, f"install succeeded: {p.stdout[-300:]}"
    return p.stderr + p.stdout


def release_objects(ns: str, release: str) -> list[dict]:
    kinds = ("deployments,services,serviceaccounts,configmaps,secrets,poddisruptionbudgets,"
             "persistentvolumeclaims,roles,rolebindings")
    items = kget(kinds, ns)["items"]
    items += [o for o in kget("clusterroles,clusterrolebindings")["items"]]
    return [o for o in items
            if (o["metadata"].get("annotations") or {}).get("meta.helm.sh/release-name") == release]


def env_of(dep: dict) -> dict[str, str]:
    c = dep["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def ensure_namespace(ns: str) -> None:
    run("kubectl", "create", "namespace", ns, ok=False)


def monitoring_crds() -> None:
    """Minimal prometheus-operator CRDs, so ServiceMonitor/PodMonitor objects can be stored."""
    docs = []
    for kind, plural in (("ServiceMonitor", "servicemonitors"), ("PodMonitor", "podmonitors")):
        docs.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": {
                                       "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
        })
    run("kubectl", "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    run("kubectl", "wait", "--for", "condition=established", "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com", "crd/podmonitors.monitoring.coreos.com")


# ---------------------------------------------------------------------- cases
def case_defaults() -> None:
    ns, rel = "caravan-system", "caravan"
    log("defaults: helm install caravan charts/caravan")
    install(rel, ns, {})
    crds = {c["metadata"]["name"]: c for c in kget("crds")["items"] if c["spec"]["group"] == "caravan.dev"}

    def crds_installed():
        assert set(crds) == {"agents.caravan.dev", "shares.caravan.dev", "trustgrants.caravan.dev"}, crds.keys()
        for c in crds.values():
            assert c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert c["metadata"]["labels"]["app.kubernetes.io/version"] == APP_VERSION
            assert c["metadata"]["annotations"]["meta.helm.sh/release-name"] == rel

    check("CRDs are release templates, kept on uninstall, labelled with the version", crds_installed)
    check("CEL rules left out for a 1.20 API server",
          lambda: "x-kubernetes-validations" not in json.dumps(list(crds.values())))
    check("the stripped CRD keeps its schema (spec.scheduling, spec.logFormat)",
          lambda: {"scheduling", "logFormat", "storage"} <= set(
              crds["agents.caravan.dev"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
              ["properties"]["spec"]["properties"]))
    objs = release_objects(ns, rel)

    def versions():
        assert len(objs) >= 6, [o["kind"] for o in objs]
        for o in objs:
            assert o["metadata"]["labels"].get("app.kubernetes.io/version") == APP_VERSION, o["metadata"]["name"]

    check(f"every object is labelled app.kubernetes.io/version={APP_VERSION}", versions)
    dep = kget("deployment", ns, "caravan-operator")
    pod = dep["spec"]["template"]["spec"]
    check("image tags default to the chart's appVersion", lambda: (
        pod["containers"][0]["image"] == f"caravan/operator:{APP_VERSION}"
        and env_of(dep)["CARAVAN_AGENT_IMAGE"] == f"caravan/agent:{APP_VERSION}"))
    check("no PodDisruptionBudget with one replica",
          lambda: not kget("poddisruptionbudgets", ns)["items"])
    check("defaults add no agent scheduling, pull secrets or Prometheus selector", lambda: not (
        {"CARAVAN_AGENT_SCHEDULING", "CARAVAN_AGENT_IMAGE_PULL_SECRETS", "CARAVAN_METRICS_NAMESPACE_LABELS",
         "CARAVAN_TENANT_PRIORITY_CLASSES", "CARAVAN_TENANT_TOLERATIONS"}
        & set(env_of(dep))) and "imagePullSecrets" not in pod and "priorityClassName" not in pod)
    check("tenants get ClusterIP Services and no annotations by default", lambda: (
        env_of(dep)["CARAVAN_TENANT_SERVICE_TYPES"] == "ClusterIP"
        and "CARAVAN_TENANT_SERVICE_ANNOTATION_PREFIXES" not in env_of(dep)))
    check("no monitors and no dashboard by default", lambda: not [
        o for o in kget("configmaps", ns)["items"] if o["metadata"]["name"].endswith("-dashboard")])


def case_provider() -> None:
    ns, rel = "provider", "prov"
    monitoring_crds()
    values = {
        "crds": {"enabled": False},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"replicas": 2, "priorityClassName": "system-cluster-critical",
                     "image": {"tag": "1.2.3", "repository": "registry.example/caravan/operator",
                               "pullPolicy": "IfNotPresent"}},
        "agent": {
            "imagePullSecrets": ["regcred"], "logFormat": "json",
            "scheduling": {
                "nodeSelector": {"pool": "agents"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "agents", "effect": "NoSchedule"}],
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                               "whenUnsatisfiable": "ScheduleAnyway",
                                               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "caravan-agent"}}}],
                "priorityClassName": "tenant-agents",
            },
            "tenantScheduling": {
                "priorityClassNames": ["tenant-high", "tenant-low"],
                "tolerations": [{"key": "caravan.dev/agents", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "tenantExposure": {
                "serviceTypes": ["ClusterIP", "LoadBalancer"],
                "serviceAnnotationPrefixes": ["service.beta.kubernetes.io/aws-load-balancer-"],
            },
        },
        "repository": {
            "enabled": True, "replicas": 2, "trustedProxies": ["10.0.0.0/8"],
            "storage": {"scheme": "s3", "options": {"bucket": "repo", "region": "eu-west-1"},
                        "existingSecret": "repo-s3"},
        },
        "metrics": {"prometheusNamespaceSelector": {"kubernetes.io/metadata.name": "monitoring"},
                    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "podMonitor": {"enabled": True}},
        "grafana": {"dashboard": {"enabled": True}},
    }
    log("provider: two replicas, pull secrets, priority, scheduling, s3 repository, monitors, dashboard")
    install(rel, ns, values)
    dep = kget("deployment", ns, "prov-caravan-operator")
    pod = dep["spec"]["template"]["spec"]
    env = env_of(dep)
    check("operator pod: imagePullSecrets, priorityClassName, image tag", lambda: (
        pod["imagePullSecrets"] == [{"name": "regcred"}]
        and pod["priorityClassName"] == "system-cluster-critical"
        and pod["containers"][0]["image"] == "registry.example/caravan/operator:1.2.3"))
    pdbs = {p["metadata"]["name"]: p for p in kget("poddisruptionbudgets", ns)["items"]}
    check("PodDisruptionBudgets for 2 operator and 2 repository replicas (policy/v1beta1 on 1.20)", lambda: (
        pdbs["prov-caravan-operator"]["spec"]["maxUnavailable"] == 1
        and pdbs["prov-caravan-operator"]["apiVersion"] == "policy/v1beta1"
        and pdbs["prov-caravan-repository"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        == "caravan-repository"))

    def agent_defaults():
        sched = json.loads(env["CARAVAN_AGENT_SCHEDULING"])
        assert sched["nodeSelector"] == {"pool": "agents"}, sched
        assert sched["tolerations"][0]["key"] == "dedicated"
        assert sched["priorityClassName"] == "tenant-agents"
        assert "affinity" not in sched, "empty fields are left out"
        assert env["CARAVAN_AGENT_IMAGE_PULL_SECRETS"] == "regcred"
        assert env["CARAVAN_AGENT_LOG_FORMAT"] == "json"
        assert env["CARAVAN_METRICS_NAMESPACE_LABELS"] == "kubernetes.io/metadata.name=monitoring"
        assert env["CARAVAN_TENANT_PRIORITY_CLASSES"] == "tenant-high,tenant-low"
        assert json.loads(env["CARAVAN_TENANT_TOLERATIONS"]) == [
            {"key": "caravan.dev/agents", "operator": "Exists", "effect": "NoSchedule"}]
        assert env["CARAVAN_TENANT_SERVICE_TYPES"] == "ClusterIP,LoadBalancer"
        assert env["CARAVAN_TENANT_SERVICE_ANNOTATION_PREFIXES"] == \
            "service.beta.kubernetes.io/aws-load-balancer-"

    check("agent scheduling, tenant allow-list, pull secrets, log format and Prometheus namespace reach the operator",
          agent_defaults)
    repo = kget("deployment", ns, "prov-caravan-repository")
    rc = repo["spec"]["template"]["spec"]["containers"][0]

    def repo_s3():
        cmd = rc["command"]
        assert cmd[cmd.index("--storage-scheme") + 1] == "s3", cmd
        assert "bucket=repo" in cmd and "region=eu-west-1" in cmd, cmd
        assert cmd[cmd.index("--storage-credentials") + 1] == "/var/run/caravan/storage"
        assert cmd[cmd.index("--trusted-proxy") + 1] == "10.0.0.0/8"
        mounts = {m["name"]: m for m in rc["volumeMounts"]}
        assert mounts["storage-credentials"]["readOnly"] is True
        vols = {v["name"]: v for v in repo["spec"]["template"]["spec"]["volumes"]}
        assert vols["storage-credentials"]["secret"]["secretName"] == "repo-s3"
        assert rc["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert rc["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert rc["image"] == f"caravan/agent:{APP_VERSION}"

    check("repository on s3: options, trusted proxy, credentials Secret read-only, /healthz probes", repo_s3)

    def monitors():
        sms = {m["metadata"]["name"]: m for m in kget("servicemonitors", ns)["items"]}
        assert set(sms) == {"prov-caravan-operator", "prov-caravan-repository"}, sms.keys()
        assert sms["prov-caravan-operator"]["metadata"]["labels"]["release"] == "prom"
        svc = kget("service", ns, "prov-caravan-operator-metrics")
        sel = sms["prov-caravan-operator"]["spec"]["selector"]["matchLabels"]
        assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items()), "selects the metrics Service"
        rsvc = kget("service", ns, "prov-caravan-repository")
        rsel = sms["prov-caravan-repository"]["spec"]["selector"]["matchLabels"]
        assert all(rsvc["metadata"]["labels"].get(k) == v for k, v in rsel.items())
        pm = kget("podmonitors", ns)["items"][0]
        assert pm["spec"]["namespaceSelector"] == {"any": True}
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

    check("ServiceMonitors select the operator and repository Services; a PodMonitor selects agents", monitors)

    def dashboard():
        cm = kget("configmap", ns, "prov-caravan-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        d = json.loads(cm["data"]["caravan.json"])
        assert d["title"].startswith("Caravan") and len(d["panels"]) >= 6

    check("Grafana dashboard ConfigMap holds the dashboard JSON", dashboard)


def case_repository_storage() -> None:
    ns = "repo-cases"
    ensure_namespace(ns)
    base = {"crds": {"enabled": False}, "rbac": {"create": False}, "serviceAccount": {"create": False},
            "metrics": {"service": False}}

    def refused(values: dict, needle: str):
        out = install_fails("bad", ns, {**base, "repository": values})
        assert needle in out, out[-500:]

    check("memory with 2 replicas is refused (state would split)",
          lambda: refused({"enabled": True, "replicas": 2}, "would split"))
    check("fs without a volume is refused",
          lambda: refused({"enabled": True, "storage": {"scheme": "fs"}}, "persistence.enabled"))
    check("fs with 2 replicas on ReadWriteOnce is refused",
          lambda: refused({"enabled": True, "replicas": 2, "storage": {"scheme": "fs"},
                           "persistence": {"enabled": True}}, "ReadWriteMany"))
    check("the schema refuses an unknown log format",
          lambda: install_fails("bad", ns, {**base, "agent": {"logFormat": "xml"}}))
    check("the schema refuses the old repository.storageScheme key",
          lambda: install_fails("bad", ns, {**base, "repository": {"enabled": True, "storageScheme": "fs"}}))
    log("repository on fs with a PersistentVolumeClaim")
    install("fsrepo", ns, {**base, "repository": {
        "enabled": True, "storage": {"scheme": "fs"}, "persistence": {"enabled": True, "size": "2Gi"}}})

    def fs_repo():
        pvc = kget("pvc", ns, "fsrepo-caravan-repository")
        assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        dep = kget("deployment", ns, "fsrepo-caravan-repository")
        assert dep["spec"]["strategy"]["type"] == "Recreate"
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert "root=/var/lib/caravan-repository" in c["command"], c["command"]
        assert {"name": "data", "mountPath": "/var/lib/caravan-repository"} in c["volumeMounts"]

    check("fs repository: a kept PVC at the storage root, Recreate strategy", fs_repo)


def case_crd_upgrade() -> None:
    """An install whose CRDs came from an older chart's crds/ (no helm ownership)
    is upgraded: the CRDs are adopted and updated, Agents survive, and they stay
    after uninstall."""
    ns, rel = "upgrade-system", "caravan-up"
    # The current release owns the CRDs from case_defaults: start from scratch.
    helm("uninstall", "caravan", "-n", "caravan-system")
    run("kubectl", "delete", "crd", "agents.caravan.dev", "shares.caravan.dev", "trustgrants.caravan.dev",
        "--wait=true", "--timeout=60s")
    path = "charts/caravan/crds/agents.caravan.dev.yaml"
    gone = run("git", "-C", str(ROOT), "rev-list", "-1", "HEAD", "--", path, ok=False).stdout.strip()
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{gone}^:{path}"], capture_output=True, text=True)
    if not gone or old.returncode != 0:
        log("SKIP CRD upgrade from the crds/ layout: no such commit in this checkout")
        return
    log("old chart layout: CRDs created from crds/ (like `helm install` of chart 0.1.0 did)")
    run("kubectl", "create", "--validate=false", "-f", "-", stdin=old.stdout)
    run("kubectl", "wait", "--for", "condition=established", "--timeout=60s", "crd/agents.caravan.dev")
    ensure_namespace("tenant-up")
    run("kubectl", "-n", "tenant-up", "create", "-f", "-",
        stdin="apiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: old}\nspec:\n  storage: {scheme: fs}\n")
    p = helm("install", rel, str(CHART), "-n", ns, "--create-namespace", ok=False)
    check("installing over un-owned CRDs without --take-ownership fails with a clear error",
          lambda: p.returncode != 0 and "ownership" in (p.stderr + p.stdout))
    helm("uninstall", rel, "-n", ns, ok=False)
    install(rel, ns, {}, extra=("--take-ownership",))

    def adopted():
        crd = kget("crd", None, "agents.caravan.dev")
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == rel
        props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert "scheduling" in props, "the new schema is on the server"

    check("helm upgrade --install --take-ownership adopts and updates the old CRDs", adopted)
    # --validate=false: kubectl checks against its cached OpenAPI (the old CRD);
    # the API server prunes unknown fields, so the stored object is the proof.
    run("kubectl", "-n", "tenant-up", "apply", "--validate=false", "-f", "-",
        stdin="apiVersion: caravan.dev/v1alpha1\nkind: Agent\nmetadata: {name: new}\nspec:\n"
              "  storage: {scheme: fs}\n  scheduling: {nodeSelector: {pool: agents}}\n")
    check("a new field is stored, not pruned", lambda: kget("agent", "tenant-up", "new")["spec"]
          ["scheduling"]["nodeSelector"] == {"pool": "agents"})
    check("the Agent made under the old CRD is still there", lambda: kget("agent", "tenant-up", "old"))

    # A later chart whose CRD changed (an extra printer column stands in for
    # any schema change): `helm upgrade` alone must carry it to the server.
    with tempfile.TemporaryDirectory() as tmp:
        nxt = Path(tmp) / "caravan"
        shutil.copytree(CHART, nxt)
        f = nxt / "files/crds/agents.caravan.dev.yaml"
        f.write_text(f.read_text().replace(
            "  - additionalPrinterColumns:\n",
            "  - additionalPrinterColumns:\n    - jsonPath: .spec.logLevel\n      name: Log\n      type: string\n", 1))
        cy = nxt / "Chart.yaml"
        cy.write_text(re.sub(r"(?m)^version: .*$", "version: 9.9.9", cy.read_text(), count=1))
        install(rel, ns, {}, chart=nxt)
    check("helm upgrade updates a changed CRD", lambda: "Log" in [
        c["name"] for c in kget("crd", None, "agents.caravan.dev")["spec"]["versions"][0]["additionalPrinterColumns"]])
    helm("uninstall", rel, "-n", ns)
    check("helm uninstall keeps the CRDs and every Agent (crds.keep)", lambda: (
        kget("crd", None, "agents.caravan.dev")
        and {a["metadata"]["name"] for a in kget("agents", "tenant-up")["items"]} == {"old", "new"}))


def main() -> int:
    for case in (case_defaults, case_provider, case_repository_storage, case_crd_upgrade):
        try:
            case()
        except Exception as e:  # noqa: BLE001
            FAILED.append(f"{case.__name__} (setup)")
            log(f"FAIL {case.__name__}: {type(e).__name__}: {e}")
    print(f"chart tests: {len(PASSED)} passed, {len(FAILED)} failed")
    for f in FAILED:
        print(f"  failed: {f}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
