#!/usr/bin/env bash
# Caravan's benchmark: throughput on loopback against rsync (daemon, plain
# and --fsync), rclone (HTTP) and aria2 (BitTorrent), interleaved in one run
# (round 1: every tool once, round 2: every tool once in an order rotated
# by one, ...), so a machine whose speed drifts slows every tool alike. Prints medians, the ratio of
# Caravan to the fastest other tool, Caravan's CPU seconds per GiB and peak
# RSS on each side (and, after round 1, once idle again), the time from `publish` to the first verified byte, the
# bytes a second version sends, and (with a local S3 server, moto) the
# bucket -> agent -> agent -> bucket case against `rclone copy` between the
# same two buckets. Beside the tools it times the disk's durable-write
# ceiling (bench/durable_copy.py: a local O_DIRECT + fdatasync copy), for
# scale: "done" means durable, and that copy is about as fast as one stream
# of durable writes lands on this disk.
#
#   bench/run.sh                           # 1 GiB file, 1000 x 1 MiB, 5 rounds
#   RUNS=3 SIZE_MB=256 FILES=200 bench/run.sh   # quicker
#   S3=0 bench/run.sh                      # skip the bucket case
#   SETS= bench/run.sh                     # only the bucket case (SETS="big" etc.)
#   TOOLS="rsync caravan" bench/run.sh     # a subset
#   KEEP=/tmp/raw.tsv bench/run.sh         # also keep the raw timings
#   AFTER_SECS=0 bench/run.sh              # skip the idle-RSS wait after round 1
#   PERF=/tmp/prof bench/run.sh            # perf record both daemons during each Caravan transfer
#   PYSPY=/tmp/spy bench/run.sh           # py-spy of moto while it serves each tool (bucket case)
#   AGENT_LOG=debug LOGS=/tmp/logs bench/run.sh  # keep both daemons' logs at that level
#
# Nothing here asserts a speed (machines are shared); every target is
# compared with its source after the first round.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-1024}
FILES=${FILES:-1000}
S3=${S3:-1}
# The loopback sets: big (one file) and many (FILES x 1 MiB); empty skips both.
SETS=${SETS-big many}
S3_MB=${S3_MB:-256}
S3_FILES=${S3_FILES:-64}
MOTO_PORT=${MOTO_PORT:-9485}
TOOLS=${TOOLS:-"rsync rsync-fsync rclone aria2 disk caravan caravan-published"}
WORK=$(mktemp -d /tmp/caravan-bench.XXXXXX)
RESULTS=$WORK/results.tsv
PIDS=()
MOTO_STARTED=0
cleanup() {
    # KEEP=file keeps the raw timings (tab-separated: set, tool, run, seconds, extras).
    if [ -n "${KEEP:-}" ] && [ -f "$RESULTS" ]; then cp "$RESULTS" "$KEEP"; fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$MOTO_STARTED" = 1 ]; then bash tests/s3/moto.sh stop "$MOTO_PORT" >/dev/null 2>&1 || true; fi
    # LOGS=dir keeps both daemons' logs (AGENT_LOG sets their RUST_LOG).
    if [ -n "${LOGS:-}" ]; then mkdir -p "$LOGS" && cp "$WORK"/*.log "$LOGS"/ 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

need() {
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}
need rsync rclone aria2 mktorrent python3 curl

if [ -z "${CARAVAN_BIN:-}" ]; then cargo build --release -q -p caravan-agent; fi
BIN=${CARAVAN_BIN:-$ROOT/target/release/caravan-agent}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# CPU seconds (user + system) a live process has used so far.
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$1/stat"; }
kib_of() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
# record SET TOOL RUN SECONDS [key=value ...]
record() { local IFS=$'\t'; echo "$*" >>"$RESULTS"; }
# Destinations are not deleted between runs but moved aside, and deleted
# together after each set's round (the other set runs next). Why: ext4
# without a journal (this machine's root) will not reuse an inode freed in
# the last 5 seconds, and scans past every such inode each time it
# allocates one; 1,000 files deleted just before a run made the next tool's
# 1,000 creations scan past 1,000 each (`recently_deleted` in `perf`), up to
# doubling its CPU, for whichever tool came next. No user deletes a tree and
# fetches it again within 5 seconds.
TRASH=0
discard() { # paths moved out of the way, deleted by empty_trash
    mkdir -p "$WORK/trash"
    for p in "$@"; do
        if [ -e "$p" ]; then TRASH=$((TRASH + 1)); mv "$p" "$WORK/trash/$TRASH"; fi
    done
}
empty_trash() { rm -rf "$WORK/trash"; sync; }
fresh_dst() { discard "$WORK/dst"; mkdir -p "$WORK/dst"; sync; }
check() { # check SET DIR: the target equals the source
    if [ "$1" = big ]; then cmp "$WORK/a/data/big/payload.bin" "$2/payload.bin"; else diff -rq "$WORK/a/data/many" "$2" >/dev/null; fi
}

# Agent A's storage root is the source for every tool.
"$BIN" init --dir "$WORK/a" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" >/dev/null 2>&1
SRC=$WORK/a/data
mkdir -p "$SRC/big" "$SRC/many"
head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC/big/payload.bin"
for i in $(seq 1 "$FILES"); do head -c 1048576 /dev/urandom >"$SRC/many/f$i.bin"; done
declare -A BYTES=([big]=$((SIZE_MB << 20)) [many]=$((FILES << 20)))

# servers for the plain tools
RP=$(port)
cat >"$WORK/rsyncd.conf" <<CONF
use chroot = no
[src]
path = $SRC
read only = yes
CONF
rsync --daemon --no-detach --port "$RP" --config "$WORK/rsyncd.conf" --address 127.0.0.1 &
PIDS+=($!)
HP=$(port)
rclone serve http "$SRC" --addr "127.0.0.1:$HP" --log-level ERROR &
PIDS+=($!)
TP=$(port)
python3 bench/tracker.py "$TP" &
PIDS+=($!)
wait_port "$RP"; wait_port "$HP"; wait_port "$TP"
for set in big many; do
    mktorrent -a "http://127.0.0.1:$TP/announce" -l 22 -o "$WORK/$set.torrent" "$SRC/$set" >/dev/null
done

run_rsync() { # set run [extra rsync flags]
    local set=$1 run=$2 name=rsync; shift 2
    [ $# -gt 0 ] && name=rsync-fsync
    fresh_dst
    local t0 t1; t0=$(now); rsync -a "$@" "rsync://127.0.0.1:$RP/src/$set/" "$WORK/dst/"; t1=$(now)
    [ "$run" = 1 ] && check "$set" "$WORK/dst"
    record "$set" "$name" "$run" "$(python3 -c "print($t1-$t0)")"
}
# Not a competitor: the disk's durable-write ceiling (bench/durable_copy.py,
# a local copy with O_DIRECT and fdatasync per file, no network, no crypto),
# so a reader sees how close a durable transfer can get on this disk.
run_disk() {
    local set=$1 run=$2; fresh_dst
    local secs; secs=$(python3 bench/durable_copy.py "$SRC/$set" "$WORK/dst")
    [ "$run" = 1 ] && check "$set" "$WORK/dst"
    record "$set" disk "$run" "$secs"
}
run_rclone() {
    local set=$1 run=$2; fresh_dst
    local t0 t1; t0=$(now)
    rclone copy --http-url "http://127.0.0.1:$HP/$set/" :http: "$WORK/dst/" --transfers 8 --log-level ERROR
    t1=$(now)
    [ "$run" = 1 ] && check "$set" "$WORK/dst"
    record "$set" rclone "$run" "$(python3 -c "print($t1-$t0)")"
}
run_aria2() {
    local set=$1 run=$2; fresh_dst
    local SP LP seeder t0 t1; SP=$(port); LP=$(port)
    aria2c -q -V --seed-ratio=0.0 --seed-time=60 --enable-dht=false --bt-enable-lpd=false \
        --enable-peer-exchange=false --listen-port="$SP" --dir "$SRC" "$WORK/$set.torrent" &
    seeder=$!
    sleep 1
    t0=$(now)
    aria2c -q --seed-time=0 --enable-dht=false --bt-enable-lpd=false --enable-peer-exchange=false \
        --listen-port="$LP" --file-allocation=none --dir "$WORK/dst" "$WORK/$set.torrent"
    t1=$(now)
    kill "$seeder" 2>/dev/null || true; wait "$seeder" 2>/dev/null || true
    [ "$run" = 1 ] && check "$set" "$WORK/dst/$set"
    record "$set" aria2 "$run" "$(python3 -c "print($t1-$t0)")"
}

# Starts agent daemon DIR, sets PID_<name>; waits for its admin port.
start_agent() { # name dir
    local admin
    admin=$(sed -n 's/^admin_listen = ".*:\([0-9]*\)"$/\1/p' "$2/agent.toml")
    RUST_LOG=${AGENT_LOG:-warn} "$BIN" run --config "$2/agent.toml" 2>>"$WORK/$1.log" &
    local pid=$!
    PIDS+=($pid)
    wait_port "$admin"
    eval "PID_$1=$pid"
}
stop_agent() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# Caravan: two daemons, fresh each run; `publish` then `fetch`, timed from
# the start of publish (what a user waits for) and fetch alone.
run_caravan() { # set run [storage-config-hook]
    local set=$1 run=$2 src=$1 dest=dst
    discard "$WORK/a/data/.caravan" "$WORK/b" "$WORK/dst"
    B_ID=$("$BIN" init --dir "$WORK/b" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" 2>/dev/null)
    if [ "${3:-}" = s3 ]; then s3_config "$WORK/a" "$S3_SRC" /; s3_config "$WORK/b" "$S3_DST" "/run$run/"; src=tree; fi
    start_agent A "$WORK/a"; start_agent B "$WORK/b"
    sync; sleep 0.5
    local idle_a idle_b ca0 cb0 ca1 cb1 t0 t1 t2 pub ticket
    idle_a=$(kib_of "$PID_A" VmRSS); idle_b=$(kib_of "$PID_B" VmRSS)
    ca0=$(cpu_of "$PID_A"); cb0=$(cpu_of "$PID_B")
    local cs0=0 server=()
    if [ "${3:-}" = s3 ]; then cs0=$(cpu_of "$MOTO_PID"); fi
    # `publish --json` prints the share id and tickets before its pass:
    # the fetch starts at once and follows the running pass.
    local first_line last_line pub_pid pub_fd
    rm -f "$WORK/pub.fifo"; mkfifo "$WORK/pub.fifo"
    # PERF=prefix: a `perf record -g` of both daemons over the transfer,
    # into prefix.set.run (read with `perf report -i`).
    local perf_pid=
    if [ -n "${PERF:-}" ]; then
        perf record -q -F 999 -g -p "$PID_A,$PID_B" -o "$PERF.$set.$run" >/dev/null 2>&1 &
        perf_pid=$!
        sleep 0.3
    fi
    t0=$(now)
    "$BIN" publish --config "$WORK/a/agent.toml" "$src" --to "$B_ID" --json >"$WORK/pub.fifo" &
    pub_pid=$!
    exec {pub_fd}<"$WORK/pub.fifo"
    read -r first_line <&"$pub_fd"
    t1=$(now)
    ticket=$(sed -E 's/.*"tickets":\[\["[^"]*","([^"]*)".*/\1/' <<<"$first_line")
    "$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest "$dest" --json >"$WORK/fetch.json"
    t2=$(now)
    read -r last_line <&"$pub_fd"
    exec {pub_fd}<&-
    wait "$pub_pid"
    ca1=$(cpu_of "$PID_A"); cb1=$(cpu_of "$PID_B")
    if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
    if [ "${3:-}" = s3 ]; then server=("cpu_server=$(python3 -c "print($(cpu_of "$MOTO_PID")-$cs0)")"); fi
    local hwm_a hwm_b after=()
    hwm_a=$(kib_of "$PID_A" VmHWM); hwm_b=$(kib_of "$PID_B" VmHWM)
    # Round 1: what both daemons hold once idle again (AFTER_SECS after
    # the fetch; the allocator returns freed buffers 250 ms after use).
    if [ "$run" = 1 ] && [ "${AFTER_SECS:-20}" != 0 ]; then
        sleep "${AFTER_SECS:-20}"
        after=("after_a=$(kib_of "$PID_A" VmRSS)" "after_b=$(kib_of "$PID_B" VmRSS)")
    fi
    stop_agent "$PID_A"; stop_agent "$PID_B"
    if [ "${3:-}" != s3 ] && [ "$run" = 1 ]; then check "$set" "$WORK/b/data/dst"; fi
    local first
    first=$(python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).read().splitlines()[-1]); assert d['state']=='done'; print($t1-$t0+(d.get('first_byte_seconds') or float('nan')))" "$WORK/fetch.json")
    pub=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['seconds'])" "$last_line")
    record "$set" caravan "$run" "$(python3 -c "print($t2-$t0)")" \
        "fetch=$(python3 -c "print($t2-$t1)")" "publish=$pub" "first=$first" \
        "cpu_a=$(python3 -c "print($ca1-$ca0)")" "cpu_b=$(python3 -c "print($cb1-$cb0)")" \
        "hwm_a=$hwm_a" "hwm_b=$hwm_b" "idle_a=$idle_a" "idle_b=$idle_b" "${after[@]}" "${server[@]}"
    discard "$WORK/b/data/dst"
}

# Caravan, a share published beforehand (untimed, like making the torrent
# for aria2): `fetch` alone, the publisher serving from its storage.
run_published() { # set run [s3]
    local set=$1 run=$2 src=$1
    discard "$WORK/a/data/.caravan" "$WORK/b" "$WORK/dst"
    B_ID=$("$BIN" init --dir "$WORK/b" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" 2>/dev/null)
    if [ "${3:-}" = s3 ]; then s3_config "$WORK/a" "$S3_SRC" /; s3_config "$WORK/b" "$S3_DST" "/pub$run/"; src=tree; fi
    start_agent A "$WORK/a"; start_agent B "$WORK/b"
    local pub ticket t0 t1 ca0 cb0 ca1 cb1 cs0=0 server=()
    pub=$("$BIN" publish --config "$WORK/a/agent.toml" "$src" --to "$B_ID" --json | tail -n 1)
    ticket=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tickets'][0][1])" "$pub")
    # Like fresh_dst before every other tool: the last tool's unwritten
    # pages go to disk now, not during this run.
    sync; sleep 0.5
    ca0=$(cpu_of "$PID_A"); cb0=$(cpu_of "$PID_B")
    if [ "${3:-}" = s3 ]; then cs0=$(cpu_of "$MOTO_PID"); fi
    local perf_pid=
    if [ -n "${PERF:-}" ]; then
        perf record -q -F 999 -g -p "$PID_A,$PID_B" -o "$PERF.$set.published.$run" >/dev/null 2>&1 &
        perf_pid=$!
        sleep 0.3
    fi
    t0=$(now)
    "$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest dst --json >"$WORK/fetch.json"
    t1=$(now)
    ca1=$(cpu_of "$PID_A"); cb1=$(cpu_of "$PID_B")
    if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
    if [ "${3:-}" = s3 ]; then server=("cpu_server=$(python3 -c "print($(cpu_of "$MOTO_PID")-$cs0)")"); fi
    local hwm_a hwm_b
    hwm_a=$(kib_of "$PID_A" VmHWM); hwm_b=$(kib_of "$PID_B" VmHWM)
    stop_agent "$PID_A"; stop_agent "$PID_B"
    if [ "${3:-}" != s3 ] && [ "$run" = 1 ]; then check "$set" "$WORK/b/data/dst"; fi
    record "$set" caravan-published "$run" "$(python3 -c "print($t1-$t0)")" \
        "cpu_a=$(python3 -c "print($ca1-$ca0)")" "cpu_b=$(python3 -c "print($cb1-$cb0)")" \
        "hwm_a=$hwm_a" "hwm_b=$hwm_b" "${server[@]}"
    discard "$WORK/b/data/dst"
}

ROUND_TOOLS=()
for t in $TOOLS; do ROUND_TOOLS+=("$t"); done
for run in $(seq 1 "$RUNS"); do
    # Each round starts one tool later (round 2: the second tool first, ...),
    # so no tool always runs right after the same one.
    off=$(((run - 1) % ${#ROUND_TOOLS[@]}))
    ORDER=("${ROUND_TOOLS[@]:off}" "${ROUND_TOOLS[@]:0:off}")
    for set in $SETS; do
        for tool in "${ORDER[@]}"; do
            case $tool in
                rsync) run_rsync "$set" "$run";;
                rsync-fsync) run_rsync "$set" "$run" --fsync;;
                rclone) run_rclone "$set" "$run";;
                disk) run_disk "$set" "$run";;
                aria2) run_aria2 "$set" "$run";;
                caravan) run_caravan "$set" "$run";;
                caravan-published) run_published "$set" "$run";;
            esac
        done
        empty_trash
        echo "round $run/$RUNS $set done" >&2
    done
done
rm -rf "$WORK/dst"

# A second version of the big file with 1% changed in 10 places.
if [[ " $SETS " == *" big "* ]]; then
    rm -rf "$WORK/a/data/.caravan" "$WORK/b"
    B_ID=$("$BIN" init --dir "$WORK/b" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" 2>/dev/null)
    start_agent A "$WORK/a"; start_agent B "$WORK/b"
    pub=$("$BIN" publish --config "$WORK/a/agent.toml" big --to "$B_ID" --json | tail -n 1)
    share=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['share_id'])" "$pub")
    ticket=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tickets'][0][1])" "$pub")
    "$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest big --json >"$WORK/v1.json"
    python3 - "$SRC/big/payload.bin" <<'PY'
import os, sys
path = sys.argv[1]
size = os.path.getsize(path)
with open(path, "r+b") as f:
    for i in range(10):
        f.seek(size * i // 10 + 12345)
        f.write(os.urandom(size // 1000))
PY
    "$BIN" publish --config "$WORK/a/agent.toml" big --share "$share" --to "$B_ID" --json >/dev/null
    "$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest big --json >"$WORK/v2.json"
    cmp "$SRC/big/payload.bin" "$WORK/b/data/big/payload.bin"
    stop_agent "$PID_A"; stop_agent "$PID_B"
fi
rm -rf "$WORK/b" "$SRC/big" "$SRC/many"

# Bucket -> agent -> agent -> bucket on a local S3 server, against
# `rclone copy` between the same two buckets (streamed through rclone:
# server-side copy disabled).
run_s3() {
    # rclone reads AWS_CA_BUNDLE even for a plain-HTTP endpoint and fails.
    unset AWS_CA_BUNDLE
    eval "$(bash tests/s3/moto.sh start "$MOTO_PORT")"
    MOTO_STARTED=1
    MOTO_PID=$(cat "${XDG_CACHE_HOME:-$HOME/.cache}/caravan/moto-$MOTO_PORT/moto.pid")
    EP=$CARAVAN_TEST_S3_ENDPOINT
    S3_SRC=bench-src-$$; S3_DST=bench-dst-$$
    curl -fsS -o /dev/null -X PUT "$EP/$S3_SRC"; curl -fsS -o /dev/null -X PUT "$EP/$S3_DST"
    export RCLONE_S3_PROVIDER=Other RCLONE_S3_ACCESS_KEY_ID=testing RCLONE_S3_SECRET_ACCESS_KEY=testing \
        RCLONE_S3_ENDPOINT=$EP RCLONE_S3_REGION=us-east-1
    mkdir -p "$WORK/tree"
    per=$(((S3_MB << 20) / S3_FILES))
    for i in $(seq 1 "$S3_FILES"); do head -c "$per" /dev/urandom >"$WORK/tree/f$i.bin"; done
    rclone copy "$WORK/tree" ":s3:$S3_SRC/tree" --log-level ERROR
    BYTES[s3]=$((per * S3_FILES))
    echo "access_key_id=testing" >"$WORK/s3.env"; echo "secret_access_key=testing" >>"$WORK/s3.env"
    s3_config() { # dir bucket root
        python3 - "$1/agent.toml" "$2" "$3" "$EP" "$WORK/s3.env" <<'PY'
import sys
path, bucket, root, ep, creds = sys.argv[1:]
head = open(path).read().split("[storage]")[0]
open(path, "w").write(head + f'[storage]\nscheme = "s3"\ncredentials = "{creds}"\n\n[storage.options]\n'
                      f'bucket = "{bucket}"\nendpoint = "{ep}"\nregion = "us-east-1"\nroot = "{root}"\n')
PY
    }
    cp "$WORK/a/agent.toml" "$WORK/a/agent.fs.toml"
    # PYSPY=prefix (a py-spy binary on PATH): moto's profile while serving
    # each tool, into prefix.{rclone,caravan,published}.run (collapsed stacks).
    local spy_pid=
    spy() { # name run | stop
        if [ -z "${PYSPY:-}" ]; then return; fi
        if [ "$1" = stop ]; then kill -INT "$spy_pid"; wait "$spy_pid" || true; return; fi
        py-spy record --nonblocking -r 250 -p "$MOTO_PID" -f raw -o "$PYSPY.$1.$2" >/dev/null 2>&1 &
        spy_pid=$!; sleep 0.5
    }
    for run in $(seq 1 "$RUNS"); do
        spy rclone "$run"
        m0=$(cpu_of "$MOTO_PID"); t0=$(now)
        rclone copy ":s3:$S3_SRC/tree" ":s3:$S3_DST/rclone$run" --disable Copy --transfers 8 --log-level ERROR
        t1=$(now)
        record s3 rclone "$run" "$(python3 -c "print($t1-$t0)")" "cpu_server=$(python3 -c "print($(cpu_of "$MOTO_PID")-$m0)")"
        spy stop
        cp "$WORK/a/agent.fs.toml" "$WORK/a/agent.toml"
        spy caravan "$run"
        run_caravan s3 "$run" s3
        spy stop
        cp "$WORK/a/agent.fs.toml" "$WORK/a/agent.toml"
        spy published "$run"
        run_published s3 "$run" s3
        spy stop
        cp "$WORK/a/agent.fs.toml" "$WORK/a/agent.toml"
        if [ "$run" = 1 ]; then
            rclone check "$WORK/tree" ":s3:$S3_DST/run1/dst" --log-level ERROR --one-way
            rclone check "$WORK/tree" ":s3:$S3_DST/pub1/dst" --log-level ERROR --one-way
        fi
        for d in rclone run pub; do rclone purge ":s3:$S3_DST/$d$run" --log-level ERROR || true; done
        echo "round $run/$RUNS s3 done" >&2
    done
    rm -rf "$WORK/tree"
}
if [ "$S3" = 1 ]; then run_s3 || echo "the bucket case failed; loopback figures follow" >&2; fi

echo
echo "Caravan benchmark, loopback, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ), $RUNS interleaved rounds"
python3 - "$RESULTS" "$WORK/v1.json" "$WORK/v2.json" "$SIZE_MB" "$FILES" "$S3_MB" "$S3_FILES" \
    "${BYTES[big]}" "${BYTES[many]}" "${BYTES[s3]:-0}" <<'PY'
import json, os, statistics, sys
from collections import defaultdict
res, v1p, v2p = sys.argv[1:4]
after_secs = os.environ.get("AFTER_SECS", "20")
size_mb, files, s3_mb, s3_files = sys.argv[4:8]
nbytes = dict(zip(["big", "many", "s3"], map(int, sys.argv[8:11])))
secs = defaultdict(list)
extra = defaultdict(lambda: defaultdict(list))
for line in open(res):
    f = line.rstrip("\n").split("\t")
    s, tool, _run, t = f[:4]
    secs[s, tool].append(float(t))
    for kv in f[4:]:
        k, v = kv.split("=")
        extra[s, tool][k].append(float(v))
med = lambda xs: statistics.median(xs)
mbps = lambda s, t: nbytes[s] / t / 1e6
labels = {"rsync": "rsync daemon (plain)", "rsync-fsync": "rsync daemon --fsync",
          "rclone": "rclone http (plain)", "aria2": "aria2 BitTorrent",
          "disk": "disk ceiling (durable cp)",
          "caravan": "caravan publish+fetch", "caravan-fetch": "caravan fetch (from tickets)",
          "caravan-published": "caravan fetch, published"}
sets = [s for s in ("big", "many") if any(k[0] == s for k in secs)]
head = {"big": f"{size_mb} MiB file", "many": f"{files} x 1 MiB"}
if sets:
    print(f"{'median MB/s (min-max)':28}" + "".join(f"{head[s]:>24}" for s in sets))
# The tools run on the loopback sets (the bucket case's rclone is not one).
tools = [t for t in ("rsync", "rsync-fsync", "rclone", "aria2", "disk", "caravan", "caravan-published") if any(k[1] == t and k[0] in sets for k in secs)]
for t in tools + (["caravan-fetch"] if "caravan" in tools else []):
    row = ""
    for s in sets:
        xs = extra[s, "caravan"]["fetch"] if t == "caravan-fetch" else secs[s, t]
        row += f"{f'{mbps(s, med(xs)):.0f} ({mbps(s, max(xs)):.0f}-{mbps(s, min(xs)):.0f})':>24}"
    print(f"{labels[t]:28}" + row)
# The disk ceiling is scale, not a competitor.
others = [t for t in tools if not t.startswith("caravan") and t != "disk"]
if others:
    for s in sets:
        best = min(others, key=lambda t: med(secs[s, t]))
        parts = []
        if "caravan" in tools:
            parts.append(f"{med(secs[s, best]) / med(secs[s, 'caravan']):.2f}x publish+fetch (live)")
        if "caravan-published" in tools:
            parts.append(f"{med(secs[s, best]) / med(secs[s, 'caravan-published']):.2f}x fetch of a published share")
        print(f"{head[s]}: caravan / fastest other ({best}) = " + ", ".join(parts))
if "disk" in tools:
    for s in sets:
        parts = [f"{med(secs[s, 'disk']) / med(secs[s, t]):.2f}x {labels[t]}" for t in others + [t for t in tools if t.startswith("caravan")]]
        print(f"{head[s]}: speed relative to the disk's durable-write ceiling: " + ", ".join(parts))
for s in sets:
    e = extra[s, "caravan-published"]
    if e:
        gib = nbytes[s] / 2**30
        print(f"{s}, published: caravan CPU-s/GiB publisher {med(e['cpu_a'])/gib:.2f}, recipient {med(e['cpu_b'])/gib:.2f}; "
              f"peak RSS publisher {max(e['hwm_a'])/1024:.0f} MiB, recipient {max(e['hwm_b'])/1024:.0f} MiB")
for s in sets + (["s3"] if ("s3", "caravan") in secs else []):
    e = extra[s, "caravan"]
    if not e:
        continue
    gib = nbytes[s] / 2**30
    print(f"{s}: caravan CPU-s/GiB publisher {med(e['cpu_a'])/gib:.2f}, recipient {med(e['cpu_b'])/gib:.2f}; "
          f"peak RSS publisher {max(e['hwm_a'])/1024:.0f} MiB, recipient {max(e['hwm_b'])/1024:.0f} MiB; "
          f"idle RSS {max(e['idle_a'] + e['idle_b'])/1024:.0f} MiB before"
          + (f", {max(e['after_a'] + e['after_b'])/1024:.0f} MiB {after_secs} s after" if e.get('after_a') else "")
          + "; "
          f"publish pass {med(e['publish']):.2f}s (fetch runs alongside); publish start -> first verified byte "
          f"{med(e['first']):.3f}s (max {max(e['first']):.3f}s); publish+fetch end to end {med(secs[s, 'caravan']):.2f}s")
if ("s3", "caravan") in secs:
    r, c = med(secs["s3", "rclone"]), med(secs["s3", "caravan"])
    print(f"bucket -> bucket, {s3_files} files, {s3_mb} MiB, moto: rclone copy {mbps('s3', r):.0f} MB/s, "
          f"caravan {mbps('s3', c):.0f} MB/s (fetch only {mbps('s3', med(extra['s3', 'caravan']['fetch'])):.0f}): {r / c:.2f}x; "
          f"moto's CPU-s per run: rclone {med(extra['s3', 'rclone']['cpu_server']):.2f}, caravan {med(extra['s3', 'caravan']['cpu_server']):.2f}")
    if ("s3", "caravan-published") in secs:
        p, e = med(secs["s3", "caravan-published"]), extra["s3", "caravan-published"]
        gib = nbytes["s3"] / 2**30
        print(f"bucket -> bucket, fetch of a published share: caravan {mbps('s3', p):.0f} MB/s: {r / p:.2f}x; "
              f"moto's CPU-s per run {med(e['cpu_server']):.2f}; caravan CPU-s/GiB publisher {med(e['cpu_a'])/gib:.2f}, "
              f"recipient {med(e['cpu_b'])/gib:.2f}; peak RSS publisher {max(e['hwm_a'])/1024:.0f} MiB, "
              f"recipient {max(e['hwm_b'])/1024:.0f} MiB")
# `fetch --json` prints JSON lines; the last one is the summary.
last = lambda p: json.loads(open(p).read().splitlines()[-1])
if os.path.exists(v2p):
    v2 = last(v2p)
    big = nbytes["big"]
    print(f"second version (1% changed in 10 places): {v2['bytes_received']/2**20:.1f} MiB sent "
          f"({100*v2['bytes_received']/big:.2f}% of the file), {v2['chunks_fetched']} of {v2['chunks_total']} chunks")
PY
