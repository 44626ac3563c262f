# Shared by the storage-server scripts in this folder (sourced, not run).
# Each server keeps its pid and log in a per-port state dir under the cache;
# `stop` kills exactly that pid, never anything found by name.

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/caravan"

# run_locked LOCKNAME COMMAND...: one installer at a time per cache entry, so
# concurrent starts (parallel test runs) never corrupt it.
run_locked() {
    local lock="$CACHE/$1.lock"
    shift
    mkdir -p "$CACHE"
    (
        flock -w 600 9
        "$@"
    ) 9>"$lock"
}

# running PIDFILE: the pid in PIDFILE is alive.
running() {
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_http NAME URL LOG: polls URL until the server answers (any HTTP status).
wait_http() {
    local i=0
    until curl -sS -o /dev/null "$2" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -ge 300 ]; then
            echo "$1 did not start within 30 s; see $3" >&2
            tail -20 "$3" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

# stop_pid PIDFILE: TERM, wait up to 5 s, then KILL that one pid.
stop_pid() {
    [ -f "$1" ] || return 0
    local pid i=0
    pid="$(cat "$1")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}
