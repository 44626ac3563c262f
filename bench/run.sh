#!/usr/bin/env bash
# Caravan's benchmark: throughput on loopback against rsync (daemon), rclone
# (HTTP) and aria2 (BitTorrent) in the same run, plus the bytes a second
# version sends and the fetching agent's peak RSS.
#
#   bench/run.sh                 # 1 GiB file and 1000 x 1 MiB files
#   SIZE_MB=256 FILES=200 bench/run.sh   # smaller, for a quick look
#
# Prints one table; nothing here asserts a speed (machines are shared).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MB=${SIZE_MB:-1024}
FILES=${FILES:-1000}
WORK=$(mktemp -d /tmp/caravan-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
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
need rsync rclone aria2 mktorrent python3

cargo build --release -q -p caravan-agent
BIN=$ROOT/target/release/caravan-agent

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
mbps() { python3 -c "print(f'{$1/($3-$2)/1e6:.0f}')"; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# payloads
mkdir -p "$WORK/src/big" "$WORK/src/many"
head -c $((SIZE_MB << 20)) /dev/urandom >"$WORK/src/big/payload.bin"
for i in $(seq 1 "$FILES"); do head -c 1048576 /dev/urandom >"$WORK/src/many/f$i.bin"; done
BIG=$((SIZE_MB << 20))
MANY=$((FILES << 20))
declare -A RES

# rsync daemon
RP=$(port)
cat >"$WORK/rsyncd.conf" <<CONF
use chroot = no
[src]
path = $WORK/src
read only = yes
CONF
rsync --daemon --no-detach --port "$RP" --config "$WORK/rsyncd.conf" --address 127.0.0.1 &
PIDS+=($!)
wait_port "$RP"
for set in big many; do
    rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; sync
    t0=$(now); rsync -a "rsync://127.0.0.1:$RP/src/$set/" "$WORK/dst/"; t1=$(now)
    RES[rsync,$set]=$t0,$t1
    # Caravan's files are fsynced when reported complete (OpenDAL's fs writer
    # syncs on close); rsync --fsync is the like-for-like comparison.
    rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; sync
    t0=$(now); rsync -a --fsync "rsync://127.0.0.1:$RP/src/$set/" "$WORK/dst/"; t1=$(now)
    RES[rsync-fsync,$set]=$t0,$t1
done

# rclone over HTTP
HP=$(port)
rclone serve http "$WORK/src" --addr "127.0.0.1:$HP" --log-level ERROR &
PIDS+=($!)
wait_port "$HP"
for set in big many; do
    rm -rf "$WORK/dst"; mkdir -p "$WORK/dst"; sync
    t0=$(now); rclone copy --http-url "http://127.0.0.1:$HP/$set/" :http: "$WORK/dst/" --transfers 8 --log-level ERROR; t1=$(now)
    RES[rclone,$set]=$t0,$t1
done

# aria2 BitTorrent with a loopback tracker
TP=$(port)
python3 bench/tracker.py "$TP" &
PIDS+=($!)
wait_port "$TP"
for set in big many; do
    rm -rf "$WORK/dst" "$WORK/t.torrent"; mkdir -p "$WORK/dst"; sync
    mktorrent -a "http://127.0.0.1:$TP/announce" -l 22 -o "$WORK/t.torrent" "$WORK/src/$set" >/dev/null
    SP=$(port); LP=$(port)
    aria2c -q -V --seed-ratio=0.0 --seed-time=60 --enable-dht=false --bt-enable-lpd=false \
        --enable-peer-exchange=false --listen-port="$SP" --dir "$WORK/src" "$WORK/t.torrent" &
    seeder=$!
    sleep 1
    t0=$(now)
    aria2c -q --seed-time=0 --enable-dht=false --bt-enable-lpd=false --enable-peer-exchange=false \
        --listen-port="$LP" --file-allocation=none --dir "$WORK/dst" "$WORK/t.torrent"
    t1=$(now)
    kill "$seeder" 2>/dev/null || true; wait "$seeder" 2>/dev/null || true
    RES[aria2,$set]=$t0,$t1
done

# Caravan: encrypted, verified, publish included
for set in big many; do
    if [ $set = big ]; then args=(--size $BIG --files 1); else args=(--size $MANY --files "$FILES"); fi
    json=$(RUST_LOG=warn "$BIN" demo "${args[@]}" --json)
    secs=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); assert d['verified']; print(d['seconds'])" "$json")
    RES[caravan,$set]=0,$secs
done

# A second version of the big file with 1% changed in 10 places, between two
# daemons, and the fetching daemon's peak RSS.
"$BIN" init --dir "$WORK/a" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" >/dev/null 2>&1
B_ID=$("$BIN" init --dir "$WORK/b" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" 2>/dev/null)
mkdir -p "$WORK/a/data/share"
cp "$WORK/src/big/payload.bin" "$WORK/a/data/share/"
RUST_LOG=warn "$BIN" run --config "$WORK/a/agent.toml" 2>>"$WORK/a.log" & PIDS+=($!)
RUST_LOG=warn "$BIN" run --config "$WORK/b/agent.toml" 2>>"$WORK/b.log" & BPID=$!; PIDS+=($BPID)
sleep 1
pub=$("$BIN" publish --config "$WORK/a/agent.toml" share --to "$B_ID" --json)
share=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['share_id'])" "$pub")
ticket=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tickets'][0][1])" "$pub")
"$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest share --json >"$WORK/v1.json"
python3 - "$WORK/a/data/share/payload.bin" <<'PY'
import os, sys
path = sys.argv[1]
size = os.path.getsize(path)
with open(path, "r+b") as f:
    for i in range(10):
        f.seek(size * i // 10 + 12345)
        f.write(os.urandom(size // 1000))
PY
"$BIN" publish --config "$WORK/a/agent.toml" share --share "$share" --to "$B_ID" --json >/dev/null
"$BIN" fetch --config "$WORK/b/agent.toml" "$ticket" --dest share --json >"$WORK/v2.json"
rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$BPID/status)
cmp "$WORK/a/data/share/payload.bin" "$WORK/b/data/share/payload.bin"

echo
echo "Caravan benchmark, loopback, $(nproc) cores, $(date -u +%FT%TZ)"
printf '%-30s %14s %14s\n' "tool" "${SIZE_MB} MiB file" "${FILES} x 1 MiB"
for tool in rsync rsync-fsync rclone aria2 caravan; do
    row=()
    for set in big many; do
        IFS=, read -r t0 t1 <<<"${RES[$tool,$set]}"
        bytes=$BIG; [ $set = many ] && bytes=$MANY
        row+=("$(mbps $bytes "$t0" "$t1") MB/s")
    done
    label=$tool
    case $tool in
        rsync) label="rsync daemon (plain)";;
        rsync-fsync) label="rsync daemon --fsync";;
        rclone) label="rclone http (plain)";;
        aria2) label="aria2 BitTorrent";;
        caravan) label="caravan (TLS+AEAD, verified)";;
    esac
    printf '%-30s %14s %14s\n' "$label" "${row[0]}" "${row[1]}"
done
python3 - "$WORK/v1.json" "$WORK/v2.json" "$rss_kb" "$BIG" <<'PY'
import json, sys
v1, v2 = (json.load(open(p)) for p in sys.argv[1:3])
rss, big = int(sys.argv[3]), int(sys.argv[4])
print(f"second version (1% changed in 10 places): {v2['bytes_received']/2**20:.1f} MiB sent "
      f"({100*v2['bytes_received']/big:.2f}% of the file), {v2['chunks_fetched']} of {v2['chunks_total']} chunks; "
      f"first version {v1['bytes_received']/2**20:.0f} MiB in {v1['seconds']:.2f}s")
print(f"fetching agent peak RSS: {rss/1024:.0f} MiB")
PY
