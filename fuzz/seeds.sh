#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/ from real processes: an fs
# repository fed by two agents (announcements, grants, a revocation), a
# published share (its signed manifest record, a ticket), plus hand-made
# frames and manifest bodies (python3). Run from the repository root after
# `cargo build -p caravan-agent`; the committed corpora came from this.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/debug/caravan-agent}
C=$ROOT/fuzz/corpus
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mkdir -p "$C"/{frame,records,manifest,ticket,repository}

RP=$(port)
"$BIN" repository --listen 127.0.0.1:$RP --storage-scheme fs --storage-option root="$W/repo" 2>"$W/repo.log" &
PIDS+=($!)
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$RP) 2>/dev/null && break; sleep 0.1; done
for n in a b; do
  "$BIN" init --dir "$W/$n" --listen 127.0.0.1:$(port) --admin 127.0.0.1:$(port) --metrics "" >"$W/$n.id"
  sed -i "s#^repositories = .*#repositories = [\"http://127.0.0.1:$RP\"]#" "$W/$n/agent.toml"
  CARAVAN_TRUST_SYNC_SECS=0.3 "$BIN" run --config "$W/$n/agent.toml" 2>"$W/$n.log" &
  PIDS+=($!)
done
sleep 2
B=$(cat "$W/b.id")
mkdir -p "$W/a/data/s" && echo hello >"$W/a/data/s/x.txt"
"$BIN" trust grant --config "$W/a/agent.toml" "$B" --depth 1 >/dev/null
"$BIN" trust revoke --config "$W/a/agent.toml" "$B" >/dev/null || true
"$BIN" publish --config "$W/a/agent.toml" s --to "$B" --json >"$W/pub.json"
sleep 1
python3 - "$W" "$C" <<'PY'
import json, os, sys, hashlib, struct
w, c = sys.argv[1], sys.argv[2]
def put(d, data):
    h = hashlib.sha256(data).hexdigest()[:16]
    open(os.path.join(c, d, h), "wb").write(data)
recs = []
for dp, _, fs in os.walk(os.path.join(w, "repo")):
    for f in fs:
        b = open(os.path.join(dp, f), "rb").read()
        if b[:3] == b"CVR":
            recs.append(b)
for dp, _, fs in os.walk(os.path.join(w, "a", "data", ".caravan")):
    for f in fs:
        b = open(os.path.join(dp, f), "rb").read()
        if b[:3] == b"CVR":
            recs.append(b)
for r in recs:
    put("records", r)
    put("repository", b"\x00" + r)
    put("frame", bytes([3]) + struct.pack(">II", 1, len(r)) + r)
frames = b"".join(struct.pack(">I", len(r)) + r for r in recs[:4])
put("records", frames)
for sel in range(1, 8):
    put("repository", bytes([sel]) + os.urandom(32).hex().encode())
put("repository", b"\x06cursor=0&limit=5")
put("frame", bytes([1]) + struct.pack(">II", 7, 40) + bytes(40))
put("frame", bytes([2]) + struct.pack(">II", 8, 64) + bytes(64))
put("frame", bytes([4]) + struct.pack(">II", 9, 0))
put("frame", bytes([0x81]) + struct.pack(">II", 9, 3) + b"abc")
pub = json.loads(open(os.path.join(w, "pub.json")).read().splitlines()[-1])
for t in pub["tickets"]:
    put("ticket", t[1].encode())
put("ticket", open(os.path.join(w, "b.id")).read().strip().encode())
put("ticket", pub["share_id"].encode())
# Manifest bodies (postcard): share id, seq, created_at, access, entries.
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])
def s(x):
    x = x.encode()
    return varint(len(x)) + x
def chunk(n):
    return os.urandom(32) + os.urandom(32) + varint(n)
body = (bytes(32) + varint(3) + varint(1_700_000_000) + varint(1) + os.urandom(32) + b"\x00"
        + varint(3)
        + s("dir/empty") + varint(0o755) + varint(1)
        + s("a.txt") + varint(0o644) + varint(0) + varint(5) + varint(1) + chunk(5)
        + s("b/c.bin") + varint(0o600) + varint(0) + varint(3 << 20) + varint(2) + chunk(2 << 20) + chunk(1 << 20))
put("manifest", body)
put("manifest", bytes(32) + varint(1) + varint(0) + varint(0) + b"\x01\x02" + varint(1) + s("../escape") + varint(0o6777) + varint(1))
PY
for d in "$C"/*; do echo "$(basename "$d"): $(ls "$d" | wc -l) seeds"; done
