#!/usr/bin/env bash
# A real S3-compatible server on loopback for tests: moto in server mode.
#
#   tests/s3/moto.sh start [PORT]   # prints the export line for the tests
#   tests/s3/moto.sh stop [PORT]
#
# PORT defaults to $CARAVAN_MOTO_PORT or 9199. The venv lives under
# ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/venv-moto and is created on first use
# (under a lock, so concurrent starts do not corrupt it). Each server writes its
# pid to a per-port state dir; `stop` kills exactly that pid. The bucket
# (default `caravan-test`, override with CARAVAN_TEST_S3_BUCKET) is created
# with a plain PUT.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caravan"
VENV="$CACHE/venv-moto"
PORT="${2:-${CARAVAN_MOTO_PORT:-9199}}"
STATE="$CACHE/moto-$PORT"
PIDFILE="$STATE/moto.pid"
BUCKET="${CARAVAN_TEST_S3_BUCKET:-caravan-test}"

ensure_venv() {
    mkdir -p "$CACHE"
    (
        flock -w 600 9
        if [ ! -x "$VENV/bin/moto_server" ]; then
            python3 -m venv "$VENV"
            "$VENV/bin/pip" install --quiet 'moto[server,s3]'
        fi
    ) 9>"$CACHE/venv-moto.lock"
}

start() {
    local port="$PORT"
    mkdir -p "$STATE"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        : # already running on this port
    else
        ensure_venv
        nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$STATE/moto.log" 2>&1 &
        echo $! >"$PIDFILE"
        local i=0
        until curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; do
            i=$((i + 1))
            if [ "$i" -ge 100 ]; then
                echo "moto did not start; see $STATE/moto.log" >&2
                exit 1
            fi
            sleep 0.1
        done
    fi
    curl -fsS -o /dev/null -X PUT "http://127.0.0.1:$port/$BUCKET" || true
    echo "export CARAVAN_TEST_S3_ENDPOINT=http://127.0.0.1:$port CARAVAN_TEST_S3_BUCKET=$BUCKET"
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
