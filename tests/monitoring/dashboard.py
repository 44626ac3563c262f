"""The Caravan Grafana dashboard: one definition, two outputs.

  dashboard.py write [OUT.json]          writes the Grafana dashboard JSON
                                         (default charts/caravan/dashboards/caravan.json)
  dashboard.py render SCRAPES.jsonl OUT.png
                                         draws the same panels with matplotlib from
                                         real scrapes (tests/monitoring/scrape.sh output)

Grafana is not packaged in Debian, so the PNG in docs/ is drawn by matplotlib
(python3-matplotlib) from the same PromQL expressions, evaluated by the small
evaluator below over raw /metrics scrapes of a running cluster. It supports the
expression shapes the dashboard uses, nothing more:
  sum(M)  count(M)  max(M)  sum by (L) (M)  sum(rate(M[W]))  sum by (L) (rate(M[W]))
  histogram_quantile(Q, sum by (le) (rate(M_bucket[W])))
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (row title, [(panel title, kind, unit, [(legend, expr)])])
ROWS = [
    ("Fleet", [
        ("Agents reporting", "stat", "none", [("agents", "count(caravan_shares_held)")]),
        ("Operator replicas leading", "stat", "none", [("leader", "sum(caravan_operator_leader)")]),
        ("Agents by phase (Ready, Sleeping, Pending, Degraded)", "timeseries", "none", [
            ("{{phase}}", "max by (phase) (caravan_operator_agents)")]),
        ("Reconciles by result", "timeseries", "ops", [
            ("{{result}}", 'sum by (result) (rate(caravan_operator_reconciles_total[5m]))')]),
        ("Reconcile errors by reason", "timeseries", "ops", [
            ("{{reason}}", 'sum by (reason) (rate(caravan_operator_reconcile_errors_total[5m]))')]),
        ("Reconcile duration p95", "timeseries", "s", [
            ("p95", 'histogram_quantile(0.95, sum by (le) (rate(caravan_operator_reconcile_duration_seconds_bucket[5m])))')]),
    ]),
    ("Transfers", [
        ("Bytes per second", "timeseries", "Bps", [
            ("in (received)", "sum(rate(caravan_bytes_received_total[5m]))"),
            ("out (served)", "sum(rate(caravan_bytes_sent_total[5m]))")]),
        ("Chunks per second", "timeseries", "ops", [
            ("received", "sum(rate(caravan_chunks_received_total[5m]))"),
            ("served", "sum(rate(caravan_chunks_sent_total[5m]))"),
            ("reused", "sum(rate(caravan_chunks_reused_total[5m]))"),
            ("rejected", "sum(rate(caravan_chunks_rejected_total[5m]))")]),
        ("Peers connected and shares held", "timeseries", "none", [
            ("peers", "sum(caravan_peers_connected)"),
            ("shares", "sum(caravan_shares_held)")]),
        ("Agent errors by kind", "timeseries", "ops", [
            ("{{kind}}", "sum by (kind) (rate(caravan_errors_total[5m]))")]),
        ("Fetch duration p95", "timeseries", "s", [
            ("p95", 'histogram_quantile(0.95, sum by (le) (rate(caravan_fetch_duration_seconds_bucket[5m])))')]),
        ("Agents' memory (RSS, all agents)", "timeseries", "bytes", [
            ("rss", "sum(caravan_process_resident_memory_bytes)")]),
    ]),
    ("Trust and repository", [
        ("Records accepted by kind (grants, revocations, announcements)", "timeseries", "ops", [
            ("{{kind}}", "sum by (kind) (rate(caravan_repository_records_accepted_total[5m]))")]),
        ("Records refused by reason", "timeseries", "ops", [
            ("{{reason}}", "sum by (reason) (rate(caravan_repository_records_rejected_total[5m]))"),
            ("rate limited", "sum(rate(caravan_repository_rate_limited_total[5m]))")]),
        ("Repository look-ups by kind", "timeseries", "ops", [
            ("{{kind}}", "sum by (kind) (rate(caravan_repository_lookups_total[5m]))")]),
    ]),
]


# ------------------------------------------------------------------ Grafana JSON
def grafana() -> dict:
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels, pid, y = [], 1, 0
    for row, items in ROWS:
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, kind, unit, targets in items:
            w, h = (6, 4) if kind == "stat" else (12, 8)
            if x + w > 24:
                x, y = 0, y + 8
            panels.append({
                "type": kind, "title": title, "id": pid, "datasource": ds,
                "gridPos": {"h": h, "w": w, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind != "stat" else
                {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
                "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend, "datasource": ds}
                            for i, (legend, e) in enumerate(targets)],
            })
            pid, x = pid + 1, x + w
        y += 8
    return {
        "title": "Caravan",
        "uid": "caravan-overview",
        "description": "Caravan fleet, transfers and trust (operator, agents, repository). "
                       "Source: tests/monitoring/dashboard.py; metrics: docs/metrics.md.",
        "tags": ["caravan"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }


# ------------------------------------------------------------------ evaluator
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), dict(LABEL.findall(m.group(3) or "")), v))
    return out


class Series:
    """Scrapes: [(t, target, [(name, labels, value)])]."""

    def __init__(self, scrapes: list[dict]):
        self.scrapes = [(s["t"], s["target"], parse_metrics(s["text"])) for s in scrapes]
        self.times = sorted({round(t) for t, _, _ in self.scrapes})

    STALE = 20.0  # seconds: a target not scraped for this long is gone (a deleted pod)

    def at(self, t: float) -> dict[str, list[tuple[str, dict, float]]]:
        """Latest scrape of each target at or before t, if it is recent."""
        latest: dict[str, tuple[float, list]] = {}
        for st, target, samples in self.scrapes:
            if st <= t and (target not in latest or latest[target][0] < st):
                latest[target] = (st, samples)
        return {k: v[1] for k, v in latest.items() if t - v[0] <= self.STALE}

    def instant(self, metric: str, t: float) -> list[tuple[dict, float]]:
        return [({**labels, "_target": target}, v) for target, samples in self.at(t).items()
                for name, labels, v in samples if name == metric]

    def rate(self, metric: str, window: float, t: float) -> list[tuple[dict, float]]:
        """Per-second increase over the scrapes of each target inside (t - window, t]
        (first to last), like Prometheus' rate without extrapolation; a counter
        that went down (a restart) counts from zero."""
        per_target: dict[str, list[tuple[float, list]]] = defaultdict(list)
        for st, target, samples in self.scrapes:
            if t - window < st <= t:
                per_target[target].append((st, samples))
        out = []
        for target, scrapes in per_target.items():
            scrapes.sort(key=lambda x: x[0])
            (t1, first), (t2, last) = scrapes[0], scrapes[-1]
            if t2 - t1 < 1 or t - t2 > self.STALE:
                continue
            start = {self._key(l): v for n, l, v in first if n == metric}
            for n, labels, v in last:
                if n != metric:
                    continue
                v0 = start.get(self._key(labels), 0.0)
                out.append(({**labels, "_target": target}, (v - v0 if v >= v0 else v) / (t2 - t1)))
        return out

    @staticmethod
    def _key(labels: dict) -> tuple:
        return tuple(sorted(labels.items()))


WINDOW = {"s": 1, "m": 60, "h": 3600}


def evaluate(expr: str, data: Series, t: float) -> dict[str, float]:
    """{legend key: value} for one expression at time t ('' for an unlabelled result)."""
    expr = expr.strip()
    m = re.fullmatch(r"histogram_quantile\(([\d.]+),\s*sum by \(le\) \(rate\((\w+)\[(\d+)([smh])\]\)\)\)", expr)
    if m:
        q, metric, w = float(m.group(1)), m.group(2), int(m.group(3)) * WINDOW[m.group(4)]
        buckets: dict[float, float] = defaultdict(float)
        for labels, v in data.rate(metric, w, t):
            buckets[float(labels["le"])] += v
        return {"": quantile(q, buckets)} if buckets else {}
    m = re.fullmatch(r"(sum|count|max)(?: by \((\w+)\))?\s*\((.*)\)", expr)
    if not m:
        raise ValueError(f"unsupported expression: {expr}")
    agg, by, inner = m.group(1), m.group(2), m.group(3).strip()
    r = re.fullmatch(r"rate\((\w+)\[(\d+)([smh])\]\)", inner)
    if r:
        vals = data.rate(r.group(1), int(r.group(2)) * WINDOW[r.group(3)], t)
    elif re.fullmatch(r"\w+", inner):
        vals = data.instant(inner, t)
    else:
        raise ValueError(f"unsupported expression: {expr}")
    groups: dict[str, list[float]] = defaultdict(list)
    for labels, v in vals:
        groups[labels.get(by, "") if by else ""].append(v)
    fn = {"sum": sum, "count": len, "max": max}[agg]
    return {k: float(fn(v)) for k, v in groups.items() if v}


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets."""
    les = sorted(buckets)
    total = buckets[les[-1]]
    if total <= 0:
        return math.nan
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-12))
        prev_le, prev_c = le, c
    return prev_le


def render(scrapes_path: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scrapes = [json.loads(line) for line in Path(scrapes_path).read_text().splitlines() if line.strip()]
    data = Series(scrapes)
    t0 = data.times[0]
    times = [t for t in data.times if t - t0 >= 60] or data.times
    panels = [(row, p) for row, items in ROWS for p in items]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.1 * nrows), facecolor="#111217")
    span = f"{(times[-1] - t0) / 60:.0f} min"
    fig.suptitle(f"Caravan — rendered with matplotlib from {len(scrapes)} real scrapes of the e2e cluster "
                 f"({span}; rates over 1m windows instead of 5m)", color="white", fontsize=13)
    for ax, (row, (title, kind, unit, targets)) in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        ax.set_title(f"{row} · {title}", color="#d8d9da", fontsize=10, loc="left")
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        for s in ax.spines.values():
            s.set_color("#2c3235")
        if kind == "stat":
            legend, expr = targets[0]
            # Grafana shows the last value; the cluster is gone at the very end
            # of a test run, so take the last time it had one, and say when.
            v, at = math.nan, times[-1]
            for t in times:
                r = evaluate(expr.replace("[5m]", "[1m]"), data, t).get("")
                if r is not None:
                    v, at = r, t
            ax.text(0.5, 0.45, "–" if math.isnan(v) else f"{v:g}", ha="center", va="center",
                    fontsize=40, color="#73bf69", transform=ax.transAxes)
            ax.text(0.5, 0.1, f"at minute {(at - t0) / 60:.1f}", ha="center", color="#9fa7b3",
                    fontsize=8, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        drawn = False
        for legend, expr in targets:
            series: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for t in times:
                for k, v in evaluate(expr.replace("[5m]", "[1m]"), data, t).items():
                    series[k].append(((t - t0) / 60, v))
            for k, pts in sorted(series.items()):
                name = re.sub(r"\{\{\w+\}\}", k or "total", legend)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.4)
                drawn = True
        if drawn:
            ax.legend(fontsize=7, facecolor="#181b1f", labelcolor="#d8d9da", edgecolor="#2c3235", loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#9fa7b3", transform=ax.transAxes)
        ax.set_xlabel("minutes", color="#9fa7b3", fontsize=8)
        ax.set_ylabel({"Bps": "bytes/s", "ops": "per second", "s": "seconds", "bytes": "bytes"}.get(unit, ""), color="#9fa7b3",
                      fontsize=8)
        ax.grid(color="#2c3235", linewidth=0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"]:
        out = Path(argv[1]) if len(argv) > 1 else ROOT / "charts/caravan/dashboards/caravan.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(grafana(), indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    if argv[:1] == ["check"]:
        path = ROOT / "charts/caravan/dashboards/caravan.json"
        if json.loads(path.read_text()) != grafana():
            print(f"{path} is out of date: run tests/monitoring/dashboard.py write", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["render"] and len(argv) == 3:
        render(argv[1], argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
