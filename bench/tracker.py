#!/usr/bin/env python3
"""A minimal BitTorrent HTTP tracker for the loopback benchmark.

It answers /announce with every peer that announced the same info_hash
(compact format), so aria2 seeders and leechers find each other without DHT.
"""
import socket
import struct
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PEERS = {}


def bencode(v):
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, str):
        return bencode(v.encode())
    if isinstance(v, dict):
        return b"d" + b"".join(bencode(k) + bencode(v[k]) for k in sorted(v)) + b"e"
    raise TypeError(type(v))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        qs = urllib.parse.parse_qs(url.query, keep_blank_values=True, encoding="latin-1")
        info = qs.get("info_hash", [""])[0].encode("latin-1")
        port = int(qs.get("port", ["0"])[0])
        peers = PEERS.setdefault(info, set())
        if qs.get("event", [""])[0] != "stopped":
            peers.add(("127.0.0.1", port))
        compact = b"".join(socket.inet_aton(ip) + struct.pack(">H", p) for ip, p in peers if p != port)
        body = bencode({"interval": 5, "peers": compact})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
