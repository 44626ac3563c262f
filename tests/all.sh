#!/usr/bin/env bash
# Every Caravan test, from a fresh Linux (Debian) machine with a Rust toolchain:
#   bash tests/all.sh
# 1. installs what the tests need (apt, pip in a venv, cargo-nextest),
# 2. checks formatting, clippy and CRD drift,
# 3. starts real storage servers on loopback: S3 (moto), Azure Blob (Azurite),
#    GCS (fake-gcs-server) and WebDAV (rclone serve webdav), tests/storage/, and s3s-fs, which
#    checks SigV4 signatures and presigned URLs (offline seeding),
# 4. runs the workspace's unit, property, multi-process and storage tests,
# 5. brings up a real single-node Kubernetes, runs the cluster and operator
#    end-to-end tests, and always tears the cluster down,
# 6. installs the chart with many value sets into a bare API server (chart tests).
# CARAVAN_SKIP_CLUSTER=1 skips step 5 (e.g. on a machine without root).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '\n[tests %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
SUMMARY=()

say "prerequisites"
# A clean clone builds everything once: incremental caches would only cost
# disk (several GB) and time.
[ -n "${CI:-}" ] && export CARGO_INCREMENTAL=0
free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
if [ "${free_gb:-0}" -lt 8 ]; then
    echo "tests/all.sh: only ${free_gb} GB free here; a clean test build needs about 8 GB (target/ and the cluster's images)" >&2
    exit 1
fi
missing=()
for pkg in python3-venv curl rclone; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
# Azurite (tests/storage/azurite.sh) runs on node; any node with npm will do.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
    as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo)
    apt_install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
    # A fresh machine may have no package lists yet.
    apt_install || { "${as_root[@]}" apt-get update -qq && apt_install; }
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

say "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The agent's light part alone, as the operator uses it (in the workspace
# build the operator's crate gets the agent's default `node` feature too).
cargo clippy -p caravan-agent --no-default-features --lib --quiet -- -D warnings
SUMMARY+=("fmt + clippy: clean")

say "storage servers on loopback: S3 (moto; s3s-fs, which checks signatures), Azure Blob (Azurite), GCS (fake-gcs-server), WebDAV (rclone)"
# Started side by side (each installs itself into the cache on first use);
# each prints the exports its tests read. Stopped by pid on any exit.
STORAGE_SERVERS=("s3/moto.sh 9477" "s3/s3s.sh 9481" "storage/azurite.sh 9478" "storage/gcs.sh 9479" "storage/webdav.sh 9480")
stop_storage() {
    for s in "${STORAGE_SERVERS[@]}"; do
        # shellcheck disable=SC2086
        bash tests/${s% *} stop ${s#* } >/dev/null 2>&1 || true
    done
}
trap stop_storage EXIT
mkdir -p target/storage-servers
started=$(date +%s)
pids=()
for s in "${STORAGE_SERVERS[@]}"; do
    # shellcheck disable=SC2086
    bash tests/${s% *} start ${s#* } >"target/storage-servers/$(basename "${s% *}" .sh).env" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for s in "${STORAGE_SERVERS[@]}"; do
    eval "$(cat "target/storage-servers/$(basename "${s% *}" .sh).env")"
done
export CARAVAN_TEST_S3_ENDPOINT CARAVAN_TEST_S3_BUCKET
export CARAVAN_TEST_S3S_ENDPOINT CARAVAN_TEST_S3S_BUCKET CARAVAN_TEST_S3S_ACCESS_KEY CARAVAN_TEST_S3S_SECRET_KEY
SUMMARY+=("storage servers: s3 (moto, s3s-fs), azblob, gcs, webdav up in $(($(date +%s) - started)) s")

say "workspace tests (unit, property, multi-process over loopback, storage services, CRD drift)"
cargo nextest run --workspace --no-fail-fast --failure-output final 2>&1 | tee target/nextest.log
SUMMARY+=("workspace: $(grep -E '^ +Summary' target/nextest.log | tail -1 | sed 's/^ *//' || true)")
while IFS= read -r line; do SUMMARY+=("  $line"); done < <(grep -E '^ +(FAIL|TIMEOUT|SIGSEGV|SIGABRT) ' target/nextest.log | sort -u | head -12 || true)

say "fuzzing smoke run (every target, bounded time; fuzz/README.md)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
bash fuzz/smoke.sh "${CARAVAN_FUZZ_SECS:-20}" 2>&1 | tee target/fuzz.log
# (grep -c exits 1 when it counts 0: that must not end the run under set -e)
SUMMARY+=("fuzz smoke: $(grep -c ' ok:' target/fuzz.log || true) targets clean ($(grep -c CRASH target/fuzz.log || true) crashed)")

if [ "${CARAVAN_SKIP_CLUSTER:-0}" = 1 ]; then
    SUMMARY+=("kubernetes e2e: skipped (CARAVAN_SKIP_CLUSTER=1)")
else
    say "Kubernetes end to end (cluster up, images, tests, cluster down)"
    bash .ci/cluster.sh run -- bash tests/e2e.sh 2>&1 | tee target/e2e.log
    SUMMARY+=("kubernetes e2e: $(grep -E '^E2E SUMMARY' target/e2e.log | tail -1 || true)")
    # The checks that failed and the waits that timed out, by name: the
    # summary is what a CI log's tail shows.
    while IFS= read -r line; do SUMMARY+=("  $line"); done < <(grep -E '\] FAIL |timed out after' target/e2e.log | head -12 || true)
fi

say "cluster scripts elevate only when needed"
bash tests/cluster/need-root-test.sh
SUMMARY+=("need-root: ok")

say "chart tests (installs into a bare API server of their own; SKIP without the Kubernetes binaries)"
bash tests/chart/run.sh 2>&1 | tee target/chart.log
SUMMARY+=("chart: $(grep -E '^(chart tests|SKIP)' target/chart.log | tail -1 || true)")

printf '\n==================== test summary ====================\n'
printf '%s\n' "${SUMMARY[@]}"
