#!/usr/bin/env bash
# An S3-compatible server on loopback that CHECKS SIGNATURES (SigV4 headers
# and presigned URLs, including their expiry): s3s-fs, from the s3s crate.
# moto accepts any signature, so tests of presigned URLs (offline seeding)
# use this one.
#
#   tests/s3/s3s.sh start [PORT]   # prints the export line for the tests
#   tests/s3/s3s.sh stop [PORT]
#
# PORT defaults to $CARAVAN_S3S_PORT or 9198. The binary is installed once
# with `cargo install` under ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/s3s-fs
# (under a lock). Each server keeps its data and pid in a per-port state dir;
# `stop` kills exactly that pid and removes the data. The bucket (default
# `caravan-seed`) is a directory under the data root.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caravan"
ROOTDIR="$CACHE/s3s-fs"
BIN="$ROOTDIR/bin/s3s-fs"
VERSION=0.14.1
PORT="${2:-${CARAVAN_S3S_PORT:-9198}}"
STATE="$CACHE/s3s-$PORT"
PIDFILE="$STATE/s3s.pid"
BUCKET="${CARAVAN_TEST_S3S_BUCKET:-caravan-seed}"
ACCESS="caravan-test-key"
SECRET="caravan-test-secret-0123456789"

ensure_bin() {
    mkdir -p "$CACHE"
    (
        flock -w 1800 9
        if [ ! -x "$BIN" ]; then
            cargo install --locked "s3s-fs@$VERSION" --features binary --root "$ROOTDIR" >&2
        fi
    ) 9>"$CACHE/s3s-fs.lock"
}

start() {
    mkdir -p "$STATE"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        : # already running on this port
    else
        ensure_bin
        rm -rf "$STATE/data"
        mkdir -p "$STATE/data/$BUCKET"
        nohup "$BIN" --host 127.0.0.1 --port "$PORT" --access-key "$ACCESS" --secret-key "$SECRET" \
            "$STATE/data" >"$STATE/s3s.log" 2>&1 &
        echo $! >"$PIDFILE"
        local i=0
        until curl -sS -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; do
            i=$((i + 1))
            if [ "$i" -ge 100 ]; then
                echo "s3s-fs did not start; see $STATE/s3s.log" >&2
                exit 1
            fi
            sleep 0.1
        done
    fi
    echo "export CARAVAN_TEST_S3S_ENDPOINT=http://127.0.0.1:$PORT CARAVAN_TEST_S3S_BUCKET=$BUCKET" \
        "CARAVAN_TEST_S3S_ACCESS_KEY=$ACCESS CARAVAN_TEST_S3S_SECRET_KEY=$SECRET CARAVAN_TEST_S3S_DATA=$STATE/data"
}

stop() {
    if [ -f "$PIDFILE" ]; then
        local pid
        pid="$(cat "$PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            local i=0
            while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do
                sleep 0.1
                i=$((i + 1))
            done
        fi
        rm -f "$PIDFILE"
        rm -rf "$STATE/data"
    fi
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start [PORT] | stop [PORT]" >&2
    exit 2
    ;;
esac
