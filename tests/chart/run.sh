#!/usr/bin/env bash
# Chart tests: installs charts/caravan with many value sets into a bare API
# server of its own (etcd + kube-apiserver on loopback; no cluster lock, no
# pods) and checks the stored objects: versions and labels, image tags, pull
# secrets, priority classes, PDBs, agent scheduling defaults, the repository's
# storage options, monitors, the dashboard, refused value combinations, and the
# CRD upgrade path (adopting crds/-era CRDs, updating, keeping on uninstall).
# SKIPs without the Kubernetes binaries. Env: HELM (default tests/cluster/helm).
set -euo pipefail
# shellcheck source=tests/chart/apiserver.sh
source "$(dirname "${BASH_SOURCE[0]}")/apiserver.sh"
apiserver_start
py=python3
[[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
"$py" "$CHART_ROOT/tests/chart/test_chart.py"
