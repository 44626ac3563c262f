#!/usr/bin/env bash
# Runs every fuzz target for a bounded time from its committed seed corpus
# (new inputs go to a scratch directory, so the committed corpus stays as is).
#   bash fuzz/smoke.sh [SECONDS_PER_TARGET=30] [TARGET...]
# Prints one line per target: executions, coverage, and whether it crashed.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); built without a sanitizer
# so the stable toolchain suffices (RUSTC_BOOTSTRAP is set for libFuzzer's flags).
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-30}
shift || true
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(frame records manifest ticket repository channel)
export RUSTC_BOOTSTRAP=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
cargo fuzz build --sanitizer none -O >/dev/null
fail=0
for t in "${TARGETS[@]}"; do
    mkdir -p "$SCRATCH/$t"
    log="$SCRATCH/$t.log"
    if cargo fuzz run --sanitizer none -O "$t" "$SCRATCH/$t" "corpus/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        fail=1
    fi
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
    printf 'fuzz %-10s %s: %s executions in %ss, coverage %s edges\n' "$t" "$status" "${execs:-?}" "$SECS" "${cov:-?}"
    [[ $status == ok ]] || { grep -E 'panicked|ERROR|Test unit written' "$log" | head -5; }
done
exit $fail
