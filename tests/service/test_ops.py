"""GET /healthz, /readyz, /models, /metrics, the page, and request ids."""

from __future__ import annotations

import re

import pytest
from service_inputs import png

from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION


def test_healthz_is_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_ready_when_every_model_is_warmed_up(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "models": {TASK_CLASSIFICATION: True, TASK_SEGMENTATION: True, TASK_DIAGNOSIS: False},
    }


def test_readyz_turns_503_once_shutdown_begins(serve, tiny_model_dir):
    with serve(tiny_model_dir) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.runtime.draining.set()  # what SIGTERM does (service.__main__)
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "shutting_down"
        assert client.get("/healthz").status_code == 200


def test_models_describes_each_served_artifact(client, tiny_model_dir):
    response = client.get("/models")
    assert response.status_code == 200
    models = response.json()["models"]
    assert set(models) == {TASK_CLASSIFICATION, TASK_SEGMENTATION, TASK_DIAGNOSIS}
    assert models[TASK_DIAGNOSIS] is None  # this registry holds no joint model
    cls = models[TASK_CLASSIFICATION]
    manifest = (tiny_model_dir / TASK_CLASSIFICATION / "v1" / "metadata.json").read_text()
    assert cls["task"] == TASK_CLASSIFICATION
    assert cls["name"] == "tiny-classification"
    assert cls["version"] == "v1"
    assert re.fullmatch(r"[0-9a-f]{64}", cls["sha256"]) and cls["sha256"] in manifest
    assert cls["metrics"] == {"test": {"accuracy": 0.9, "n": 100}}
    assert cls["class_names"] == ["normal", "benign", "malignant"]
    assert cls["preprocessing"]["resize"] == 64 and cls["preprocessing"]["crop"] == 56
    assert cls["input"]["height"] == 56
    assert models[TASK_SEGMENTATION]["output"]["threshold"] == 0.5
    assert models[TASK_SEGMENTATION]["class_names"] is None


def test_metrics_expose_latencies_failures_and_model_versions(client):
    client.post("/diagnose", content=png(), headers={"Content-Type": "image/png"})
    client.post("/classify", content=b"", headers={"Content-Type": "image/png"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(
        r'busi_http_request_duration_seconds_bucket\{endpoint="/diagnose",le="0.005",status="200"\}',
        text,
    )
    assert 'busi_http_request_duration_seconds_count{endpoint="/classify",status="400"}' in text
    for stage, task in [
        ("decode", ""),
        ("preprocess", TASK_CLASSIFICATION),
        ("inference", TASK_CLASSIFICATION),
        ("postprocess", TASK_CLASSIFICATION),
        ("inference", TASK_SEGMENTATION),
    ]:
        assert f'busi_stage_duration_seconds_count{{stage="{stage}",task="{task}"}}' in text
    assert re.search(r'busi_request_failures_total\{reason="empty_input"\} [1-9]', text)
    assert re.search(
        r'busi_model_info\{name="tiny-classification",sha256="[0-9a-f]{64}",'
        r'task="classification",version="v1"\} 1.0',
        text,
    )
    assert 'busi_model_reloads_total{outcome="loaded",task="segmentation"} 1.0' in text
    assert "busi_ready 1.0" in text
    assert "busi_inference_waiting 0.0" in text


def test_unmatched_paths_share_one_metric_label(client):
    client.get("/no/such/path/12345")
    assert "/no/such/path" not in client.get("/metrics").text


def test_request_id_is_generated_and_echoed(client):
    response = client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


@pytest.mark.parametrize(
    "generated",
    [
        "3f2b1c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    ],
)
def test_client_request_id_is_kept_when_it_looks_generated(client, generated):
    response = client.post(
        "/classify",
        content=png(),
        headers={"Content-Type": "image/png", "X-Request-ID": generated},
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == generated
    assert response.json()["request_id"] == generated


@pytest.mark.parametrize(
    "unsafe",
    [
        "has space",
        "x" * 65,
        "<script>",
        "a/b",
        "pacs-42.a_b",  # a free-text token
        "1234567890123456",  # an accession number: digits only, however long
        "2024-000123-4567-89",  # digits and dashes
        "ACC20240001234567",  # an accession number of hex-looking characters: too short
        "Z" + "1" * 40,  # letters beyond a-f
        "Doe_Jane_1962-03-04",  # a name
        "abc-123",  # too short to be generated
    ],
)
def test_a_client_request_id_that_could_be_patient_data_is_replaced(client, unsafe):
    response = client.get("/healthz", headers={"X-Request-ID": unsafe})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_unmatched_is_only_for_paths_no_route_serves(client):
    client.get("/docs")
    client.get("/openapi.json")
    client.get("/static/app.js")
    client.post("/classify", content=b"", headers={"Content-Length": str(10**9)})
    client.get("/no/such/path")
    client.get("/classify")  # a route, not this method: 405
    text = client.get("/metrics").text
    for endpoint, status in [
        ("/docs", 200),
        ("/openapi.json", 200),
        ("/static/*", 200),
        ("/classify", 413),
        ("unmatched", 404),
        ("/classify", 405),
    ]:
        series = (
            f'busi_http_request_duration_seconds_count{{endpoint="{endpoint}",status="{status}"}}'
        )
        assert series in text, series


def test_metrics_expose_the_process_and_the_build(client):
    text = client.get("/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert re.search(rf"^{name} \d", text, flags=re.MULTILINE), name
    assert re.search(r'^busi_build_info\{.*version="[^"]+".*\} 1.0$', text, flags=re.MULTILINE)


def test_root_serves_the_page_and_static_files(client):
    from service.routes.page import STATIC_DIR

    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == (STATIC_DIR / "index.html").read_bytes()
    for path in STATIC_DIR.iterdir():
        if path.is_file():
            assert client.get(f"/static/{path.name}").content == path.read_bytes()
    assert client.get("/static/nope.js").status_code == 404
