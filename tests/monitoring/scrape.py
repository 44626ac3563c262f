"""Scrapes every Caravan /metrics endpoint of the cluster (and extra URLs) at an
interval, like Prometheus would, into JSON lines {t, target, text} for
tests/monitoring/dashboard.py render. Bounded: stops when STOP_FILE exists or
after MAX_SECONDS.

  scrape.py OUT.jsonl STOP_FILE [INTERVAL=5] [MAX_SECONDS=3600]

Targets: pods labelled app.kubernetes.io/part-of=caravan — agents on :9400,
operators on :8080, repositories on :7500 (pod IPs are routable from the node)
— plus one URL per line of the file $CARAVAN_SCRAPE_EXTRA (agents run by tests
on this host).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

PORTS = {"caravan-agent": 9400, "caravan-operator": 8080, "caravan-repository": 7500}


def targets() -> list[str]:
    out = []
    try:
        p = subprocess.run(["kubectl", "--request-timeout", "10s", "get", "pods", "-A", "-l",
                            "app.kubernetes.io/part-of=caravan", "-o", "json"],
                           capture_output=True, text=True, timeout=20)
        for pod in json.loads(p.stdout or "{}").get("items", []):
            name = pod["metadata"].get("labels", {}).get("app.kubernetes.io/name")
            ip = pod.get("status", {}).get("podIP")
            if name in PORTS and ip and pod["status"].get("phase") == "Running":
                out.append(f"http://{ip}:{PORTS[name]}/metrics")
    except (subprocess.SubprocessError, ValueError, KeyError):
        pass
    extra = os.environ.get("CARAVAN_SCRAPE_EXTRA")
    if extra and os.path.exists(extra):
        out += [line.strip() for line in open(extra) if line.strip()]
    return out


def main(argv: list[str]) -> int:
    out, stop = argv[0], argv[1]
    interval = float(argv[2]) if len(argv) > 2 else 5.0
    deadline = time.time() + (float(argv[3]) if len(argv) > 3 else 3600)
    with open(out, "a") as f:
        while not os.path.exists(stop) and time.time() < deadline:
            t = time.time()
            for url in targets():
                try:
                    text = urllib.request.urlopen(url, timeout=3).read().decode("utf-8", "replace")
                except OSError:
                    continue
                f.write(json.dumps({"t": t, "target": url, "text": text}) + "\n")
            f.flush()
            time.sleep(max(0.0, interval - (time.time() - t)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
