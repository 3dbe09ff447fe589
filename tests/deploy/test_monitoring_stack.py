"""The monitoring stack against the real thing: promtool checks the alert rules, and a real
Prometheus (Debian's package, .ci/install-prometheus.sh) scrapes a running service and evaluates
every alert rule and every query of the Grafana dashboard without error."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from service_process import QUIET_ENV, ServiceProcess, free_port

from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "busi-api.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
_NO_PROMETHEUS = "Debian's prometheus is not installed (.ci/install-prometheus.sh, run by test.sh)"


def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in document["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def exported_names() -> set[str]:
    from service.metrics import ServiceMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in ServiceMetrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def test_the_dashboard_names_only_metrics_the_service_exposes():
    queries = dashboard_queries()
    assert len(queries) >= 15
    named = {n for q in queries for n in re.findall(r"\b(?:busi|process)_[a-z_]+", q)}
    assert named - exported_names() == set()
    panels = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for wanted in ("Requests per second by endpoint", "Errors per second by reason",
                   "p95 latency by stage", "Mean batch size", "Drift (PSI) by quantity",
                   "Out-of-distribution share", "Model versions serving"):  # fmt: skip
        assert wanted in panels


def test_the_dashboard_is_provisioned_beside_prometheus():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    source = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    uids = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"]
            for t in p.get("targets", [])}  # fmt: skip
    assert uids == {source["uid"]}
    assert source["url"] == "http://prometheus:9090"


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason=_NO_PROMETHEUS)
def test_promtool_accepts_the_alert_rules():
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_queries())} rules found" in done.stdout


def _png() -> bytes:
    pixels = np.full((80, 96), 100, dtype=np.uint8)
    pixels[20:50, 30:70] = 230
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _get(url: str, **params: str) -> dict:
    response = httpx.get(url, params=params, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason=_NO_PROMETHEUS)
def test_a_real_prometheus_scrapes_the_service_and_evaluates_every_expression(
    tmp_path, publish_tiny
):
    registry = tmp_path / "models"
    publish_tiny(registry, TASK_CLASSIFICATION, "v1")
    publish_tiny(registry, TASK_SEGMENTATION, "v1")
    env = {**QUIET_ENV, "MODEL_DIR": str(registry), "LOG_FORMAT": "text"}
    with ServiceProcess(env, tmp_path / "service.log") as service:
        service.wait_for("/readyz")
        for body in (_png(), _png(), b"not an image"):  # traffic: the histograms get children
            httpx.post(f"{service.url}/diagnose", content=body, timeout=30)
        port = free_port()
        rules = tmp_path / "alerts.yml"
        rules.write_text(ALERTS.read_text())
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": "busi-api", "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}],
            }],
        }  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        with (tmp_path / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api/v1"
        try:
            deadline = time.monotonic() + 60
            while True:  # the target scraped and every rule evaluated at least twice
                assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
                try:
                    targets = _get(f"{api}/targets")["activeTargets"]
                    groups = _get(f"{api}/rules")["groups"]
                    evaluated = all(g.get("lastEvaluation", "").startswith("20") for g in groups)
                    if targets and targets[0]["health"] == "up" and groups and evaluated:
                        scraped = _get(f"{api}/query", query="busi_ready")["result"]
                        if scraped:
                            time.sleep(3)
                            break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "prometheus did not scrape and evaluate"
                time.sleep(0.5)
            rules_seen = [r for g in _get(f"{api}/rules")["groups"] for r in g["rules"]]
            assert len(rules_seen) == len(alert_queries())
            for rule in rules_seen:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            for query in dashboard_queries() + alert_queries():
                _get(f"{api}/query", query=query)  # status success: it parses and evaluates
            # the counters the alerts read exist before their first increment
            for name in ("busi_model_gate_refusals_total", "busi_slow_client_timeouts_total"):
                assert _get(f"{api}/query", query=name)["result"], name
            for query in ("busi_drift_ood_score_count > 0", "sum(busi_request_failures_total) > 0"):
                assert _get(f"{api}/query", query=query)["result"], query
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
