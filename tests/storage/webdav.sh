#!/usr/bin/env bash
# A real WebDAV server on loopback for tests: `rclone serve webdav` (Debian's
# rclone package) over a scratch folder, with basic auth.
#
#   tests/storage/webdav.sh start [PORT]   # prints the export line for the tests
#   tests/storage/webdav.sh stop [PORT]
#
# PORT defaults to 9542. rclone is installed with apt when missing. The served
# folder ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/webdav-PORT/root is emptied on
# each start. User and password are test-only values printed with the endpoint.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PORT="${2:-9542}"
STATE="$CACHE/webdav-$PORT"
PIDFILE="$STATE/rclone.pid"
USER_NAME=caravan
PASSWORD=caravan-test-only

install() {
    command -v rclone >/dev/null && return 0
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null ||
        { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null; }
}

start() {
    mkdir -p "$STATE"
    if ! running "$PIDFILE"; then
        run_locked apt-rclone install
        rm -rf "$STATE/root"
        mkdir -p "$STATE/root"
        # An empty config of its own: never the user's rclone remotes.
        : >"$STATE/rclone.conf"
        nohup rclone serve webdav "$STATE/root" --config "$STATE/rclone.conf" \
            --addr "127.0.0.1:$PORT" --user "$USER_NAME" --pass "$PASSWORD" \
            --log-level NOTICE >"$STATE/rclone.log" 2>&1 &
        echo $! >"$PIDFILE"
        wait_http "rclone serve webdav" "http://127.0.0.1:$PORT/" "$STATE/rclone.log"
    fi
    echo "export CARAVAN_TEST_WEBDAV_ENDPOINT=http://127.0.0.1:$PORT CARAVAN_TEST_WEBDAV_USER=$USER_NAME CARAVAN_TEST_WEBDAV_PASSWORD=$PASSWORD"
}

case "${1:-}" in
start) start ;;
stop) stop_pid "$PIDFILE" ;;
*)
    echo "usage: $0 start [PORT] | stop [PORT]" >&2
    exit 2
    ;;
esac
