"""Print every query of the Grafana dashboard with its current value from a Prometheus.

    python scripts/dashboard-values.py [--prometheus http://127.0.0.1:9090] \
        [--dashboard deploy/grafana/dashboards/busi-api.json]

One line per series: panel title, legend (from the labels) and value, rounded. What the dashboard
would show now, without Grafana: for a quick look on a host, or a note in a report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (the operator's URL)
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), template or "")
    return text.strip() or ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument(
        "--dashboard", type=Path, default=REPO / "deploy/grafana/dashboards/busi-api.json"
    )
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            series = query(args.prometheus, target["expr"])
            if not series:
                print(f"{panel['title']} | (no data) | {target['expr']}")
            for item in series:
                labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
                value = float(item["value"][1])
                print(f"{panel['title']} | {legend(target.get('legendFormat', ''), labels)} | "
                      f"{value:.4g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
