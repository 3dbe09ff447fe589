"""Live reload: a newly published version is loaded beside the old one and swapped in."""

from __future__ import annotations

import re
import threading
import time

import pytest
from service_inputs import png

from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION

pytestmark = pytest.mark.slow
HEADERS = {"Content-Type": "image/png"}


@pytest.fixture
def registry_dir(tmp_path, publish_tiny):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
    return tmp_path


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_new_version_is_picked_up_while_requests_run(serve, registry_dir, publish_tiny):
    with serve(registry_dir, RELOAD_INTERVAL_S=0.1) as client:
        results: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def send_requests() -> None:
            while not stop.is_set():
                response = client.post("/diagnose", content=png(), headers=HEADERS)
                body = response.json()
                version = (
                    body["classification"]["model"]["version"] if response.is_success else None
                )
                results.append((response.status_code, version))

        sender = threading.Thread(target=send_requests)
        sender.start()
        try:
            wait_for(lambda: len(results) >= 5)
            publish_tiny(
                registry_dir, TASK_CLASSIFICATION, "v2", created_at="2026-02-01T00:00:00+00:00"
            )
            wait_for(lambda: results and results[-1][1] == "v2")
            settled = len(results)
            wait_for(lambda: len(results) >= settled + 5)
        finally:
            stop.set()
            sender.join()
        metrics = client.get("/metrics").text

    assert {status for status, _ in results} == {200}
    versions = [version for _, version in results]
    switch = versions.index("v2")
    assert set(versions[:switch]) == {"v1"} and set(versions[switch:]) == {"v2"}
    assert 'busi_model_reloads_total{outcome="loaded",task="classification"} 2.0' in metrics
    served = re.findall(
        r'busi_model_info\{[^}]*task="classification",version="(\w+)"\} 1.0', metrics
    )
    assert served == ["v2"]


def test_failing_new_version_keeps_the_old_one_serving(serve, registry_dir, publish_tiny, caplog):
    with serve(registry_dir, RELOAD_INTERVAL_S=0.1) as client:
        publish_tiny(
            registry_dir,
            TASK_SEGMENTATION,
            "v2",
            created_at="2026-02-01T00:00:00+00:00",
            model="broken-segmentation",
        )

        def failure_counted() -> bool:
            return 'outcome="failed",task="segmentation"} 1.0' in client.get("/metrics").text

        wait_for(failure_counted)
        response = client.post("/segment", content=png(), headers=HEADERS)
        assert response.status_code == 200
        assert response.json()["model"]["version"] == "v1"
        assert client.get("/readyz").status_code == 200
        time.sleep(0.3)  # more polls: the refused version is not retried (nor counted) again
        assert failure_counted()
    assert (
        "refusing segmentation version v2: the warm-up forward failed; version v1 keeps serving"
        in caplog.text
    )


def test_new_version_failing_its_checksum_is_rejected_and_counted(
    serve, registry_dir, publish_tiny
):
    with serve(registry_dir, RELOAD_INTERVAL_S=0.1) as client:
        info = publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2", promote=False)
        with info.model_path.open("ab") as fh:
            fh.write(b"tampered")
        wait_for(
            lambda: 'outcome="rejected",task="classification"} 1.0' in client.get("/metrics").text
        )
        response = client.post("/classify", content=png(), headers=HEADERS)
        assert response.status_code == 200
        assert response.json()["model"]["version"] == "v1"


def test_changing_the_pin_rolls_back(serve, registry_dir, publish_tiny):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2", created_at="2026-02-01T00:00:00+00:00")
    with serve(registry_dir, RELOAD_INTERVAL_S=0.1) as client:

        def serving() -> str:  # /models: /readyz shows no versions
            return client.get("/models").json()["models"][TASK_CLASSIFICATION]["version"]

        assert serving() == "v2"
        client.app.state.runtime.registry.set_pin(TASK_CLASSIFICATION, "v1")
        wait_for(lambda: serving() == "v1")


def test_a_model_published_after_start_up_makes_the_service_ready(serve, tmp_path, publish_tiny):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    with serve(tmp_path, RELOAD_INTERVAL_S=0.1) as client:
        assert client.get("/readyz").status_code == 503
        publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
        wait_for(lambda: client.get("/readyz").status_code == 200)
