#!/usr/bin/env bash
# Offline seeding benchmark: fetching a share from the publisher's bucket
# (presigned URLs, publisher stopped) against fetching it from the live
# publisher, on loopback, with real daemons. Prints, per mode: fetch
# seconds and MB/s, the publisher's CPU seconds per GiB served (the goal
# offline: zero, since it is not running), the recipient's, and the
# bucket server's (s3s-fs, which checks every signature). Nothing asserts
# a speed: the figures go to docs/cost.md.
#
#   bench/offline.sh                 # 1 GiB in 16 files, 1 round
#   SIZE_MB=256 RUNS=3 bench/offline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MB=${SIZE_MB:-1024}
FILES=${FILES:-16}
RUNS=${RUNS:-1}
S3S_PORT=${S3S_PORT:-9512}
WORK=$(mktemp -d /tmp/caravan-offline-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    bash tests/s3/s3s.sh stop "$S3S_PORT" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${CARAVAN_BIN:-}" ]; then cargo build --release -q -p caravan-agent; fi
BIN=${CARAVAN_BIN:-$ROOT/target/release/caravan-agent}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$1/stat"; }
calc() { python3 -c "print(round($1, 3))"; }

eval "$(bash tests/s3/s3s.sh start "$S3S_PORT")"
S3S_PID=$(cat "${XDG_CACHE_HOME:-$HOME/.cache}/caravan/s3s-$S3S_PORT/s3s.pid")
BUCKET_DIR="$CARAVAN_TEST_S3S_DATA/$CARAVAN_TEST_S3S_BUCKET"

# The payload, written straight into s3s-fs's data folder (it stores each
# object as a file), under the publisher's root `pub/`. The share is that
# whole root: s3s-fs answers a HEAD of a "folder" key with a 500.
echo "generating $SIZE_MB MiB in $FILES files…" >&2
mkdir -p "$BUCKET_DIR/pub/data" "$WORK/src"
per=$((SIZE_MB / FILES))
for i in $(seq 1 "$FILES"); do
    head -c "$((per << 20))" /dev/urandom >"$BUCKET_DIR/pub/data/file-$i.bin"
done
BYTES=$((per * FILES << 20))

REPO_PORT=$(port)
RUST_LOG=warn "$BIN" repository --listen "127.0.0.1:$REPO_PORT" 2>>"$WORK/repo.log" &
PIDS+=($!)
wait_port "$REPO_PORT"
REPO="http://127.0.0.1:$REPO_PORT"

printf 'access_key_id=%s\nsecret_access_key=%s\n' "$CARAVAN_TEST_S3S_ACCESS_KEY" "$CARAVAN_TEST_S3S_SECRET_KEY" >"$WORK/s3.creds"
setup() { # dir scheme; prints the agent id
    "$BIN" init --dir "$1" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" 2>/dev/null
    python3 - "$1/agent.toml" "$2" "$REPO" "$CARAVAN_TEST_S3S_ENDPOINT" "$CARAVAN_TEST_S3S_BUCKET" "$WORK/s3.creds" <<'PY'
import sys
path, scheme, repo, ep, bucket, creds = sys.argv[1:]
text = open(path).read().replace("repositories = []", f'repositories = ["{repo}"]')
if scheme == "s3":
    head = text.split("[storage]")[0]
    text = (head + f'[storage]\nscheme = "s3"\ncredentials = "{creds}"\n\n[storage.options]\n'
            f'bucket = "{bucket}"\nendpoint = "{ep}"\nregion = "us-east-1"\nroot = "/pub/"\n')
open(path, "w").write(text)
PY
}
start_agent() { # name dir
    local admin
    admin=$(sed -n 's/^admin_listen = ".*:\([0-9]*\)"$/\1/p' "$2/agent.toml")
    RUST_LOG=warn "$BIN" run --config "$2/agent.toml" 2>>"$WORK/$1.log" &
    local pid=$!
    PIDS+=($pid)
    wait_port "$admin"
    eval "PID_$1=$pid"
}
stop_agent() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

setup "$WORK/a" s3 >/dev/null
# The same files on a local disk, for a live publisher that does not read
# through s3s-fs (whose ranged reads are slow and CPU-hungry on its side).
setup "$WORK/l" fs >/dev/null
cp -r "$BUCKET_DIR/pub/data" "$WORK/l/data/data"
RESULTS=()
for run in $(seq 1 "$RUNS"); do
    for mode in peer-local peer bucket; do
        rm -rf "$WORK/b"
        B_ID=$(setup "$WORK/b" fs)
        pubdir="$WORK/a"; [ "$mode" = peer-local ] && pubdir="$WORK/l"
        start_agent A "$pubdir"; start_agent B "$WORK/b"
        extra=()
        [ "$mode" = bucket ] && extra=(--offline-seeding --url-validity 1h)
        ca0=$(cpu_of "$PID_A")
        pub=$("$BIN" publish --config "$pubdir/agent.toml" "" --to "$B_ID" "${extra[@]}" --json)
        ca1=$(cpu_of "$PID_A")
        ticket=$(python3 -c "import json,sys; print(json.loads(sys.argv[1].splitlines()[-1])['tickets'][0][1])" "$pub")
        if [ "$mode" = bucket ]; then stop_agent "$PID_A"; fi
        cb0=$(cpu_of "$PID_B"); cs0=$(cpu_of "$S3S_PID")
        t0=$(now)
        "$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest got --json >"$WORK/fetch.json"
        t1=$(now)
        cb1=$(cpu_of "$PID_B"); cs1=$(cpu_of "$S3S_PID")
        if [ "$mode" != bucket ]; then ca2=$(cpu_of "$PID_A"); else ca2=$ca1; fi
        cmp <(cat "$BUCKET_DIR"/pub/data/file-*.bin | sha256sum) <(cat "$WORK"/b/data/got/data/file-*.bin | sha256sum) >/dev/null \
            || { echo "fetched files differ ($mode)" >&2; exit 1; }
        [ "$mode" != bucket ] && stop_agent "$PID_A"
        stop_agent "$PID_B"
        gib=$(calc "$BYTES / 2**30")
        RESULTS+=("$(printf '%-10s run %s  fetch %7.2f s  %7.1f MB/s  publisher CPU-s/GiB served %6.3f  recipient CPU-s/GiB %6.2f  bucket server CPU-s/GiB %6.2f  publish+stage CPU-s %6.2f  publisher running: %s' \
            "$mode" "$run" "$(calc "$t1 - $t0")" "$(calc "$BYTES / ($t1 - $t0) / 1e6")" \
            "$(calc "($ca2 - $ca1) / $gib")" "$(calc "($cb1 - $cb0) / $gib")" "$(calc "($cs1 - $cs0) / $gib")" \
            "$(calc "$ca1 - $ca0")" "$([ "$mode" != bucket ] && echo yes || echo no)")")
        echo "${RESULTS[-1]}" >&2
    done
done
echo
echo "offline seeding benchmark: $SIZE_MB MiB in $FILES files, loopback, $(nproc) cores, $(date -u +%F)"
printf '%s\n' "${RESULTS[@]}"
