#!/usr/bin/env bash
# Every Caravan test, from a fresh Linux (Debian) machine with a Rust toolchain:
#   bash tests/all.sh
# 1. installs what the tests need (apt, pip in a venv, cargo-nextest),
# 2. checks formatting, clippy and CRD drift,
# 3. starts real S3-compatible servers on loopback (moto; s3s-fs, which
#    checks SigV4 signatures and presigned URLs, for offline seeding),
# 4. runs the workspace's unit, property, multi-process and S3 tests,
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
missing=()
for pkg in python3-venv curl; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

say "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
SUMMARY+=("fmt + clippy: clean")

say "S3-compatible servers on loopback (moto; s3s-fs, which checks signatures and presigned URLs)"
eval "$(bash tests/s3/moto.sh start 9477)"
export CARAVAN_TEST_S3_ENDPOINT CARAVAN_TEST_S3_BUCKET
trap 'bash tests/s3/moto.sh stop 9477 >/dev/null 2>&1 || true; bash tests/s3/s3s.sh stop 9478 >/dev/null 2>&1 || true' EXIT
# s3s-fs is installed once with `cargo install` (cached under ~/.cache/caravan).
eval "$(bash tests/s3/s3s.sh start 9478)"
export CARAVAN_TEST_S3S_ENDPOINT CARAVAN_TEST_S3S_BUCKET CARAVAN_TEST_S3S_ACCESS_KEY CARAVAN_TEST_S3S_SECRET_KEY

say "workspace tests (unit, property, multi-process over loopback, S3, CRD drift)"
cargo nextest run --workspace --no-fail-fast --failure-output final 2>&1 | tee target/nextest.log
SUMMARY+=("workspace: $(grep -E '^ +Summary' target/nextest.log | tail -1 | sed 's/^ *//')")

say "fuzzing smoke run (every target, bounded time; fuzz/README.md)"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
bash fuzz/smoke.sh "${CARAVAN_FUZZ_SECS:-20}" 2>&1 | tee target/fuzz.log
SUMMARY+=("fuzz smoke: $(grep -c ' ok:' target/fuzz.log) targets clean ($(grep -c CRASH target/fuzz.log) crashed)")

if [ "${CARAVAN_SKIP_CLUSTER:-0}" = 1 ]; then
    SUMMARY+=("kubernetes e2e: skipped (CARAVAN_SKIP_CLUSTER=1)")
else
    say "Kubernetes end to end (cluster up, images, tests, cluster down)"
    bash .ci/cluster.sh run -- bash tests/e2e.sh 2>&1 | tee target/e2e.log
    SUMMARY+=("kubernetes e2e: $(grep -E '^E2E SUMMARY' target/e2e.log | tail -1)")
fi

say "cluster scripts elevate only when needed"
bash tests/cluster/need-root-test.sh
SUMMARY+=("need-root: ok")

say "chart tests (installs into a bare API server of their own; SKIP without the Kubernetes binaries)"
bash tests/chart/run.sh 2>&1 | tee target/chart.log
SUMMARY+=("chart: $(grep -E '^(chart tests|SKIP)' target/chart.log | tail -1)")

printf '\n==================== test summary ====================\n'
printf '%s\n' "${SUMMARY[@]}"
