"""Two replicas on one model folder, as the Kubernetes Deployment runs them on one shared claim:
a version published while a client alternates between them reaches both within the reload
interval, and no request fails on the way.

Two real `python -m service` processes (tests/service_process.py) on a registry in a temporary
folder; the version is published the way the training job publishes (shared.store, atomic).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_process import ServiceProcess

from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION

pytestmark = pytest.mark.slow

RELOAD_INTERVAL_S = 1.0
# After the check that sees the new folder, a replica verifies, loads and warms up the version
# before it swaps it in: a fraction of a second for the tiny test models on an idle machine,
# more on this shared 2-core one.
LOAD_SLACK_S = 3.0


def _png() -> bytes:
    pixels = np.full((64, 64), 120, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_two_replicas_on_one_model_folder_both_serve_a_new_version_without_a_failed_request(
    tmp_path: Path, publish_tiny
):
    registry = tmp_path / "models"
    publish_tiny(registry, TASK_CLASSIFICATION, "v1")
    publish_tiny(registry, TASK_SEGMENTATION, "v1")
    env = {
        "MODEL_DIR": str(registry),
        "RELOAD_INTERVAL_S": str(RELOAD_INTERVAL_S),
        "TORCH_THREADS": "1",
        "LOG_FORMAT": "text",
    }
    image = _png()
    with (
        ServiceProcess(env, tmp_path / "replica-a.log") as a,
        ServiceProcess(env, tmp_path / "replica-b.log") as b,
        httpx.Client(timeout=30) as client,
    ):
        replicas = [a, b]
        for replica in replicas:
            replica.wait_for("/readyz")
        answers: list[tuple[int, int, str, float]] = []  # replica, status, version, when

        def ask(index: int) -> None:
            # A transport error (refused, reset) raises here and fails the test as well.
            response = client.post(
                f"{replicas[index].url}/classify",
                content=image,
                headers={"Content-Type": "image/png"},
            )
            version = response.json()["model"]["version"] if response.is_success else "-"
            answers.append((index, response.status_code, version, time.monotonic()))

        for turn in range(6):
            ask(turn % 2)
        publish_tiny(registry, TASK_CLASSIFICATION, "v2", created_at="2026-02-01T00:00:00+00:00")
        published = time.monotonic()
        deadline = published + RELOAD_INTERVAL_S + LOAD_SLACK_S + 10  # to report, not to pass
        turn = 0
        while time.monotonic() < deadline:
            ask(turn % 2)
            turn += 1
            if {i for i, _, v, _ in answers if v == "v2"} == {0, 1}:
                break
        for _ in range(6):  # and they stay there
            ask(turn % 2)
            turn += 1
        models = [client.get(f"{r.url}/models").json() for r in replicas]

    assert [status for _, status, _, _ in answers] == [200] * len(answers)
    first_v2 = {}
    for index in (0, 1):
        versions = [v for i, _, v, _ in answers if i == index]
        switch = versions.index("v2") if "v2" in versions else len(versions)
        assert versions[:switch] == ["v1"] * switch, f"replica {index} went back: {versions}"
        assert versions[switch:] == ["v2"] * (len(versions) - switch)
        assert switch < len(versions), f"replica {index} never served v2: {versions}"
        first_v2[index] = next(t for i, _, v, t in answers if i == index and v == "v2")
    lag = {index: round(when - published, 2) for index, when in first_v2.items()}
    print(f"seconds from the publish to the first v2 answer, per replica: {lag}")
    assert max(lag.values()) <= RELOAD_INTERVAL_S + LOAD_SLACK_S, f"seconds to v2: {lag}"
    assert answers[0][2] == "v1" and len(answers) >= 14
    for listing in models:
        assert "v2" in str(listing)
