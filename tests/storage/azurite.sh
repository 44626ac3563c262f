#!/usr/bin/env bash
# A real Azure Blob server on loopback for tests: Azurite (the npm package),
# blob service only, in memory, telemetry off.
#
#   tests/storage/azurite.sh start [PORT]   # prints the export line for the tests
#   tests/storage/azurite.sh stop [PORT]
#
# PORT defaults to 9540. Azurite is installed once (pinned version, under a
# lock) into ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/npm-azurite-VERSION, never into the
# checkout. Two containers are created with a SharedKey-signed request from
# Azurite's well-known development account: CONTAINER and CONTAINER-2
# (CONTAINER defaults to caravan-test, override with CARAVAN_TEST_AZBLOB_CONTAINER).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

VERSION=3.37.0
DIR="$CACHE/npm-azurite-$VERSION"
PORT="${2:-9540}"
STATE="$CACHE/azurite-$PORT"
PIDFILE="$STATE/azurite.pid"
CONTAINER="${CARAVAN_TEST_AZBLOB_CONTAINER:-caravan-test}"
# Azurite's published development account (not a secret: it is in Azure's docs).
ACCOUNT=devstoreaccount1
KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='

install() {
    if [ ! -x "$DIR/node_modules/.bin/azurite-blob" ]; then
        command -v npm >/dev/null || {
            echo "azurite needs node and npm (apt-get install nodejs npm)" >&2
            exit 1
        }
        mkdir -p "$DIR"
        (cd "$DIR" && npm install --no-audit --no-fund --loglevel=error --no-save "azurite@$VERSION" >&2)
    fi
}

# Creates one container (PUT ?restype=container) signed with SharedKey; an
# existing container (409) is fine.
create_container() {
    node - "$PORT" "$ACCOUNT" "$KEY" "$1" <<'JS'
const [port, account, key, container] = process.argv.slice(2);
const crypto = require("crypto");
const http = require("http");
const date = new Date().toUTCString();
const version = "2021-08-06";
const toSign = ["PUT", "", "", "", "", "", "", "", "", "", "", "",
  `x-ms-date:${date}\nx-ms-version:${version}`,
  `/${account}/${account}/${container}\nrestype:container`].join("\n");
const sig = crypto.createHmac("sha256", Buffer.from(key, "base64")).update(toSign, "utf8").digest("base64");
const req = http.request({ host: "127.0.0.1", port, method: "PUT",
  path: `/${account}/${container}?restype=container`,
  headers: { "x-ms-date": date, "x-ms-version": version, "Content-Length": 0,
    Authorization: `SharedKey ${account}:${sig}` } }, (res) => {
  let body = "";
  res.on("data", (d) => (body += d));
  res.on("end", () => {
    if (res.statusCode !== 201 && res.statusCode !== 409) {
      console.error(`creating container ${container}: HTTP ${res.statusCode} ${body}`);
      process.exit(1);
    }
  });
});
req.on("error", (e) => { console.error(e.message); process.exit(1); });
req.end();
JS
}

start() {
    mkdir -p "$STATE"
    if ! running "$PIDFILE"; then
        run_locked "npm-azurite-$VERSION" install
        # From the state dir: whatever Azurite writes beside itself stays there.
        cd "$STATE"
        nohup "$DIR/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$PORT" \
            --inMemoryPersistence --disableTelemetry --silent \
            --skipApiVersionCheck --loose >"$STATE/azurite.log" 2>&1 &
        echo $! >"$PIDFILE"
        wait_http azurite "http://127.0.0.1:$PORT/" "$STATE/azurite.log"
    fi
    create_container "$CONTAINER"
    create_container "$CONTAINER-2"
    echo "export CARAVAN_TEST_AZBLOB_ENDPOINT=http://127.0.0.1:$PORT/$ACCOUNT CARAVAN_TEST_AZBLOB_CONTAINER=$CONTAINER CARAVAN_TEST_AZBLOB_ACCOUNT=$ACCOUNT CARAVAN_TEST_AZBLOB_KEY=$KEY"
}

case "${1:-}" in
start) start ;;
stop) stop_pid "$PIDFILE" ;;
*)
    echo "usage: $0 start [PORT] | stop [PORT]" >&2
    exit 2
    ;;
esac
