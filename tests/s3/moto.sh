#!/usr/bin/env bash
# A real S3-compatible server on loopback for tests: moto in server mode.
#
#   tests/s3/moto.sh start [PORT]   # prints the export line for the tests
#   tests/s3/moto.sh stop
#
# The venv lives under ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/venv-moto and is
# created on first use. The server writes its pid to the state dir; `stop` kills
# exactly that pid. The bucket (default `caravan-test`, override with
# CARAVAN_TEST_S3_BUCKET) is created with a plain PUT.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caravan"
VENV="$CACHE/venv-moto"
STATE="$CACHE/moto"
PIDFILE="$STATE/moto.pid"
PORTFILE="$STATE/moto.port"
BUCKET="${CARAVAN_TEST_S3_BUCKET:-caravan-test}"

ensure_venv() {
    if [ ! -x "$VENV/bin/moto_server" ]; then
        mkdir -p "$CACHE"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet 'moto[server,s3]'
    fi
}

start() {
    local port="${1:-${CARAVAN_MOTO_PORT:-9199}}"
    mkdir -p "$STATE"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        port="$(cat "$PORTFILE")"
    else
        ensure_venv
        nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$STATE/moto.log" 2>&1 &
        echo $! >"$PIDFILE"
        echo "$port" >"$PORTFILE"
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
        rm -f "$PIDFILE" "$PORTFILE"
    fi
}

case "${1:-}" in
start) start "${2:-}" ;;
stop) stop ;;
*)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
