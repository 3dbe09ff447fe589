"""Running for months: drift gauges against the artifact's reference, shadow scoring of a
candidate, the model card, traces, and counters that exist before their first increment."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from service_inputs import png
from test_joint_model import TinyJoint, joint_metadata
from torch import nn

from service import tracing
from service.metrics import ServiceMetrics
from service.shadow import ShadowScorer, mask_dice, parse_shadow_version
from shared.drift import MANIFEST_FIELD, DriftReference, default_edges, histogram, psi
from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.promotion import GateFloors, promote
from shared.store import publish_artifact

PNG = {"Content-Type": "image/png"}


class ShiftedJoint(TinyJoint):
    """TinyJoint whose class logits lean towards malignant: it disagrees on mid-grey frames."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        logits = s * self.rig + self.bias + torch.tensor([0.0, 0.0, 3.0])
        return logits, 20.0 * (x.mean(dim=1, keepdim=True) - 0.5)


def publish_joint(
    model_dir: Path, version: str, module: nn.Module | None = None, **extra: Any
) -> None:
    model_file = model_dir.parent / f"{version}.pt"
    torch.jit.script((module or TinyJoint()).eval()).save(str(model_file))
    publish_artifact(model_dir, TASK_DIAGNOSIS, version, model_file, {**joint_metadata(), **extra})


def frame(grey: int, lesion: int = 250, side: int = 96) -> np.ndarray:
    pixels = np.full((side, side), grey, dtype=np.uint8)
    pixels[30:60, 30:60] = lesion
    return pixels


def metric(client: Any, name: str, **labels: str) -> float | None:
    """The value of one sample of /metrics (None when it is not exported)."""
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# --- the statistic ---------------------------------------------------------------------------


def test_psi_is_zero_for_the_reference_itself_and_grows_with_the_shift():
    reference = [50, 30, 20]
    assert psi(reference, [5, 3, 2]) == pytest.approx(0.0)
    small = psi(reference, [45, 33, 22])
    large = psi(reference, [10, 30, 60])
    assert 0 < small < 0.1 < 0.25 < large
    with pytest.raises(ValueError, match="different bins"):
        psi(reference, [1, 2])


def test_values_beyond_the_edges_fall_in_the_outer_bins():
    edges = default_edges(CLASS_NAMES)["width"]
    assert histogram(edges, [-5, 0, 100, 300, 5000, float("nan")]) == [3, 1, 0, 0, 0, 0, 0, 0, 0, 1]


def test_a_malformed_reference_is_refused_with_the_reason():
    good = DriftReference.from_values(CLASS_NAMES, {"busi": {"width": [500.0, 600.0]}}).to_dict()
    assert DriftReference.from_dict(json.loads(json.dumps(good))).pooled("width")[5] == 1
    bad = json.loads(json.dumps(good))
    bad["sites"]["busi"]["counts"]["width"] = [1, 2]
    with pytest.raises(ValueError, match="width needs 10 counts"):
        DriftReference.from_dict(bad)
    with pytest.raises(ValueError, match="not a busi-drift-reference/1"):
        DriftReference.from_dict({"format": "other"})


# --- drift in the service --------------------------------------------------------------------


def reference_of_answers(bodies: list[dict[str, Any]], sizes: list[tuple[int, int]]) -> dict:
    """A reference binned from the service's own answers (what drift-reference computes)."""
    values: dict[str, list[float]] = {"width": [], "height": [], "lesion_area_fraction": []}
    for body, (w, h) in zip(bodies, sizes, strict=True):
        for name, p in body["classification"]["probabilities"].items():
            values.setdefault(f"probability_{name}", []).append(p)
        values["width"].append(w)
        values["height"].append(h)
        seg = body["segmentation"]
        values["lesion_area_fraction"].append(seg["lesion_area_fraction"] if seg else 0.0)
    return DriftReference.from_values(CLASS_NAMES, {"site-a": values}).to_dict()


def test_drift_gauges_stay_low_on_reference_like_traffic_and_rise_when_it_shifts(
    serve, tmp_path, caplog
):
    models = tmp_path / "models"
    publish_joint(models, "j1")
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    greys = [90, 100, 110, 120] * 3
    with caplog.at_level(logging.INFO, logger="service.drift"), serve(models) as client:
        bodies = []
        for grey in greys:
            answer = client.post("/diagnose", content=png(frame(grey)), headers=PNG)
            assert answer.status_code == 200
            bodies.append(answer.json())
        # no reference: the histograms count, no PSI gauge, and a log line says why
        assert metric(client, "busi_drift_ood_score_count", version="j1") == len(greys)
        assert metric(client, "busi_drift_psi", version="j1") is None
        assert "version j1 carries no drift reference" in caplog.text
        assert metric(client, "busi_drift_scanner_total", manufacturer="none") == len(greys)

    reference = reference_of_answers(bodies, [(96, 96)] * len(greys))
    publish_joint(models, "j2", **{MANIFEST_FIELD: reference})
    promote(models, TASK_DIAGNOSIS, "j2", GateFloors())
    with serve(models, DRIFT_WINDOW=12, DRIFT_MIN_SAMPLES=12) as client:
        for grey in greys[:-1]:
            client.post("/diagnose", content=png(frame(grey)), headers=PNG)
        assert metric(client, "busi_drift_psi", version="j2") is None  # 11 < DRIFT_MIN_SAMPLES
        client.post("/diagnose", content=png(frame(greys[-1])), headers=PNG)
        for quantity in ("probability_benign", "width", "lesion_area_fraction"):
            assert metric(client, "busi_drift_psi", version="j2", quantity=quantity) == (
                pytest.approx(0.0, abs=1e-9)
            )
        # another scanner's frames: brighter and larger
        for _ in range(12):
            client.post("/diagnose", content=png(frame(200, side=600)), headers=PNG)
        assert metric(client, "busi_drift_psi", version="j2", quantity="width") > 1.0
        assert metric(client, "busi_drift_psi", version="j2", quantity="probability_benign") > 0.25
        assert metric(client, "busi_drift_window_size", version="j2") == 12


# --- shadow scoring --------------------------------------------------------------------------


def wait_scored(scorer: ShadowScorer, n: int) -> None:
    for _ in range(n):
        assert scorer.scored.acquire(timeout=30), "the shadow thread did not score in time"


def test_a_shadow_candidate_scores_sampled_requests_and_counts_agreement(serve, tmp_path):
    models = tmp_path / "models"
    publish_joint(models, "j1")
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    publish_joint(models, "cand", ShiftedJoint())  # published, never promoted
    with serve(models, SHADOW_VERSION="diagnosis/cand", SHADOW_SAMPLE=1.0) as client:
        scorer = client.app.state.runtime.shadow
        assert scorer.candidate is not None
        for grey in (20, 110, 110):  # dark: both say normal; mid-grey: benign vs malignant
            answer = client.post("/diagnose", content=png(frame(grey, lesion=grey)), headers=PNG)
            assert answer.status_code == 200
            assert answer.json()["classification"]["model"]["version"] == "j1"  # j1 answers
        lesion = png(frame(110, lesion=250))  # /classify: labels compared, no mask served
        assert client.post("/classify", content=lesion, headers=PNG).status_code == 200
        wait_scored(scorer, 4)
        pair = {"task": TASK_DIAGNOSIS, "serving": "j1", "candidate": "cand"}
        assert metric(client, "busi_shadow_label_agreement_total", **pair, agree="true") == 1
        assert metric(client, "busi_shadow_label_agreement_total", **pair, agree="false") == 3
        assert metric(client, "busi_shadow_requests_total", **pair, outcome="scored") == 4
        assert metric(client, "busi_shadow_requests_total", **pair, outcome="dropped") == 0
        # masks only where the served answer has one: the two benign /diagnose answers (empty,
        # as the candidate's are): Dice 1 each; not the normal one, not /classify
        assert metric(client, "busi_shadow_mask_dice_count", **pair) == 2
        assert metric(client, "busi_shadow_mask_dice_sum", **pair) == pytest.approx(2.0)


def test_a_full_shadow_queue_drops_rather_than_waits(tmp_path, serve):
    models = tmp_path / "models"
    publish_joint(models, "j1")
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    publish_joint(models, "cand")
    with serve(models) as client:
        runtime = client.app.state.runtime
        scorer = ShadowScorer(runtime.registry, runtime.metrics, TASK_DIAGNOSIS, "cand", 1.0, 1)
        assert scorer.load()  # loaded, but its thread is not started: nothing leaves the queue
        runtime.predictor.observers.append(scorer.offer)
        started = time.perf_counter()
        for _ in range(3):
            client.post("/diagnose", content=png(frame(110)), headers=PNG)
        assert time.perf_counter() - started < 10
        labels = {"task": TASK_DIAGNOSIS, "serving": "j1", "candidate": "cand"}
        assert metric(client, "busi_shadow_requests_total", **labels, outcome="dropped") == 2
        runtime.predictor.observers.remove(scorer.offer)


def test_a_shadow_version_that_does_not_exist_leaves_the_service_serving(serve, tmp_path, caplog):
    models = tmp_path / "models"
    publish_joint(models, "j1")
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    with caplog.at_level(logging.ERROR), serve(models, SHADOW_VERSION="diagnosis/nope") as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/diagnose", content=png(frame(110)), headers=PNG).status_code == 200
    assert "no shadow scoring: diagnosis version nope cannot be loaded" in caplog.text


def test_shadow_settings_are_checked():
    assert parse_shadow_version("diagnosis/v2") == ("diagnosis", "v2")
    with pytest.raises(ValueError, match="<task>/<version>"):
        parse_shadow_version("v2")
    from service.settings import Settings

    with pytest.raises(ValueError, match="SHADOW_VERSION is <task>/<version>"):
        Settings(SHADOW_VERSION="nonsense")
    empty, full = np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)
    assert mask_dice(empty, empty) == 1.0
    assert mask_dice(full, empty) == 0.0


# --- the model card --------------------------------------------------------------------------


def test_the_card_reads_sites_figures_and_scope_from_the_manifest(serve, tmp_path):
    models = tmp_path / "models"
    per_site = {"busi": {"accuracy": 0.84, "n_images": 780}, "bus-bra": {"accuracy": 0.8}}
    held_out = {"bus-bra": {"accuracy": 0.71, "trained_on": ["busi"]}}
    publish_joint(
        models, "j1",
        metrics={**joint_metadata()["metrics"], "sites": per_site, "held_out_sites": held_out},
        scope={"sites": ["busi", "bus-bra"], "scanners": {"bus-bra": ["GE Logiq 7"]}},
        limitations=["Trained on two sites only."],
    )  # fmt: skip
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    with serve(models) as client:
        response = client.get("/models/diagnosis/card")
        assert response.status_code == 200
        card = response.json()
        assert card["version"] == "j1"
        assert card["training"]["sites"] == ["busi", "bus-bra"]
        assert card["training"]["scanners"] == {"bus-bra": ["GE Logiq 7"]}
        assert card["performance"]["per_site"] == per_site
        assert card["performance"]["held_out_sites"] == held_out
        assert card["limitations"][0] == "Trained on two sites only."
        assert card["calibration"]["calibrated"] is False
        data = {d["site"]: d for d in card["data"]}
        assert "doi:10.1016/j.dib.2019.104863" in data["busi"]["citation"]
        assert "cites the article" in data["bus-bra"]["licence"]
        assert data["busi"]["licence"] is None  # not in the manifest: not guessed
        assert "data.licences" not in card["missing"]  # one site's is known
        # the joint model answers /classify too: the classification card is its card
        assert client.get("/models/classification/card").json()["version"] == "j1"
        assert client.get("/models/nonsense/card").status_code == 422


def test_the_card_of_a_manifest_without_the_new_blocks_names_what_is_missing(client):
    response = client.get("/models/classification/card")
    assert response.status_code == 200
    card = response.json()
    assert card["training"]["sites"] is None
    assert card["performance"]["per_site"] is None
    assert set(card["missing"]) >= {
        "training.sites", "training.scanners", "performance.per_site",
        "performance.held_out_sites", "data.licences",
    }  # fmt: skip
    assert card["limitations"]  # the general ones at least


# --- traces ----------------------------------------------------------------------------------


def test_a_request_is_one_trace_with_a_span_per_stage_and_the_trace_id_in_the_log(
    serve, tmp_path, caplog
):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    models = tmp_path / "models"
    publish_joint(models, "j1")
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(environ={}, exporter=exporter)
    root = logging.getLogger()
    try:
        with caplog.at_level(logging.INFO), serve(models) as client:
            root.addHandler(caplog.handler)  # install_trace_ids filters the root's handlers
            tracing.install_trace_ids()
            response = client.post("/diagnose", content=png(frame(110)), headers=PNG)
            assert response.status_code == 200
    finally:
        root.removeHandler(caplog.handler)
        tracing.disable_tracing()
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    assert {"decode", "preprocess", "forward", "postprocess", "present", "POST /diagnose"} <= set(
        by_name
    )
    trace_ids = {s.context.trace_id for s in spans}
    assert len(trace_ids) == 1  # one request, one trace
    forward = by_name["forward"].attributes
    assert forward["busi.batch_size"] == 1
    assert forward["busi.queue_wait_s"] >= 0
    assert forward["busi.model_version"] == "j1"
    assert by_name["POST /diagnose"].attributes["http.response.status_code"] == 200
    # no patient data: attributes are timings, counts, task, version, method, route and status
    allowed = {"busi.task", "busi.model_version", "busi.queue_wait_s", "busi.batch_size",
               "busi.graph", "http.request.method", "http.route",
               "http.response.status_code"}  # fmt: skip
    for span in spans:
        assert set(span.attributes) <= allowed, span.name
    trace_id = format(trace_ids.pop(), "032x")
    logged = [r for r in caplog.records if getattr(r, "trace_id", None) == trace_id]
    assert logged, "no log line carries the request's trace id"


def test_tracing_is_off_without_an_exporter_setting():
    assert tracing.exporter_from_env({}) is None
    assert tracing.exporter_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "otlp"
    assert tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "console"}) == "console"
    assert tracing.configure_tracing(environ={}) is False


# --- counters that exist before their first increment -------------------------------------


def test_every_labelled_counter_an_alert_reads_is_exported_at_zero():
    text = ServiceMetrics().exposition().decode()
    for sample in (
        'busi_model_gate_refusals_total{reason="accuracy",task="diagnosis"} 0.0',
        'busi_slow_client_timeouts_total{phase="headers"} 0.0',
        'busi_slow_client_timeouts_total{phase="body"} 0.0',
        'busi_model_reloads_total{outcome="failed",task="diagnosis"} 0.0',
        'busi_request_failures_total{reason="unauthorized"} 0.0',
        'busi_inference_rejected_total{reason="queue_full"} 0.0',
    ):
        assert sample in text


def test_the_card_of_a_task_no_model_serves_is_a_404(client):
    response = client.get("/models/diagnosis/card")  # separate models answer /diagnose here
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "no diagnosis model is served here" in response.json()["error"]["message"]


def _dicom_from(manufacturer: str, model: str) -> bytes:
    import io

    from pydicom import dcmread
    from service_inputs import dicom

    ds = dcmread(io.BytesIO(dicom(frame(110))))
    ds.Manufacturer, ds.ManufacturerModelName = manufacturer, model
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_scanners_are_counted_by_manufacturer_and_model_in_a_bounded_set(serve, tmp_path):
    models = tmp_path / "models"
    publish_joint(models, "j1")
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    dicom_type = {"Content-Type": "application/dicom"}
    with serve(models, DRIFT_MAX_SCANNERS=1) as client:
        for data in (_dicom_from("GE", "Logiq 7\x00"), _dicom_from("Acme", "X1")):
            assert client.post("/diagnose", content=data, headers=dicom_type).status_code == 200
        text = client.get("/metrics").text
        assert metric(client, "busi_drift_scanner_total", manufacturer="GE", model="Logiq 7") == 1
        assert metric(client, "busi_drift_scanner_total", manufacturer="other") == 1  # past the cap
        assert "Acme" not in text and "Doe^Jane" not in text  # no other header value is exported


def test_the_card_reads_the_scope_and_figures_training_sites_publishes(serve, tmp_path):
    """The layout of training.sites.manifest_metrics: scope and held-out figures in `metrics`."""
    models = tmp_path / "models"
    trained_on = {
        "bus-bra": {"images": 1500, "groups": 800, "classes": {"benign": 1000},
                    "devices": {"GE Logiq 7": 900, "Toshiba Aplio 300": 600}},
        "busi": {"images": 500, "groups": 400, "classes": {"normal": 100},
                 "devices": {"unrecorded": 500}},
    }  # fmt: skip
    metrics = {
        **joint_metadata()["metrics"],
        "kind": "site-held-out",
        "note": "held_out_sites first",
        "held_out_sites": {"bus-bra": {"bus-bra": {"accuracy": 0.7}}},
        "held_out_scanners": {"GE Logiq 7": {"bus-bra": {"accuracy": 0.72}}},
        "sites": {"busi": {"accuracy": 0.85}, "bus-bra": {"accuracy": 0.8}},
        "scope": {
            "trained_on": trained_on,
            "validated_on": {"busi": {"images": 120}},
            "not_validated": "sites, scanners and populations other than those listed",
        },
        "holdout": "fold:0",
    }
    publish_joint(models, "j1", metrics=metrics)
    promote(models, TASK_DIAGNOSIS, "j1", GateFloors())
    with serve(models) as client:
        card = client.get("/models/diagnosis/card").json()
    assert card["training"]["sites"] == ["bus-bra", "busi"]
    assert card["training"]["scanners"] == {
        "bus-bra": ["GE Logiq 7", "Toshiba Aplio 300"], "busi": ["unrecorded"],
    }  # fmt: skip
    assert card["training"]["per_site"] == trained_on
    assert card["training"]["validated_on"] == {"busi": {"images": 120}}
    assert card["performance"]["held_out_sites"] == metrics["held_out_sites"]
    assert card["performance"]["held_out_scanners"] == metrics["held_out_scanners"]
    assert card["performance"]["per_site"] == metrics["sites"]
    assert "Not validated on: sites, scanners" in card["limitations"][0]
    assert card["missing"] == []  # BUS-BRA's licence is known; BUSI's stays null
    assert {d["site"] for d in card["data"]} == {"bus-bra", "busi"}
