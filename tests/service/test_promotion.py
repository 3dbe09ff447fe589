"""The promotion gate: candidates serve only once promoted, and only if their manifest passes."""

from __future__ import annotations

import json
import logging
import time

import pytest
from service_inputs import png
from tiny_manifests import promote_unchecked

from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION, TASKS
from shared.promotion import (
    PROMOTIONS_FILE,
    GateFloors,
    PromotionRefusedError,
    gate_refusals,
    read_promotions,
)
from shared.store import verify_artifact
from training import promote as promote_cli

HEADERS = {"Content-Type": "image/png"}
SMOKE = {"training": {"preset": "tiny", "smoke": True, "epochs": 1}}


@pytest.fixture
def registry_dir(tmp_path, publish_tiny):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
    return tmp_path


def served(client, task=TASK_CLASSIFICATION) -> str | None:
    model = client.get("/models").json()["models"][task]
    return model and model["version"]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_published_candidate_does_not_serve_until_promoted(serve, registry_dir, publish_tiny):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2", promote=False,
                 created_at="2026-02-01T00:00:00+00:00")  # fmt: skip
    with serve(registry_dir, RELOAD_INTERVAL_S=0.05) as client:
        assert served(client) == "v1"
        time.sleep(0.3)  # several polls: the candidate is seen, and stays a candidate
        assert served(client) == "v1"
        assert promote_cli.main("promote", [TASK_CLASSIFICATION, "v2",
                                            "--model-dir", str(registry_dir)]) == 0  # fmt: skip
        wait_for(lambda: served(client) == "v2")
        response = client.post("/classify", content=png(), headers=HEADERS)
        assert response.status_code == 200 and response.json()["model"]["version"] == "v2"
        metrics = client.get("/metrics").text
    assert 'busi_model_promotion_changes_total{task="classification"} 1.0' in metrics


def test_promote_refuses_a_smoke_run_and_changes_nothing(registry_dir, publish_tiny, caplog):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "smoke-1", promote=False, **SMOKE)
    before = (registry_dir / PROMOTIONS_FILE).read_bytes()
    with caplog.at_level(logging.ERROR):
        status = promote_cli.main(
            "promote", [TASK_CLASSIFICATION, "smoke-1", "--model-dir", str(registry_dir)]
        )
    assert status == 1
    assert "classification version smoke-1 fails the gate: it is a smoke run" in caplog.text
    assert (registry_dir / PROMOTIONS_FILE).read_bytes() == before


def test_the_service_gate_refuses_a_smoke_run_even_when_the_record_promotes_it(
    serve, registry_dir, publish_tiny, caplog
):
    # e.g. someone edited promotions.json by hand: the service checks the gate itself
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "smoke-1", promote=False, **SMOKE)
    promote_unchecked(registry_dir, TASK_CLASSIFICATION, "smoke-1")
    with caplog.at_level(logging.INFO), serve(registry_dir) as client:
        assert served(client) == "v1"  # the one promoted before it
        models = client.get("/models").json()
        metrics = client.get("/metrics").text
    assert models["promoted"][TASK_CLASSIFICATION] == "smoke-1"
    assert models["fallback"] == {TASK_CLASSIFICATION: "smoke-1"}
    assert models["gate_refused"] == {TASK_CLASSIFICATION: {"smoke-1": "it is a smoke run"}}
    assert 'busi_model_gate_refusals_total{reason="smoke",task="classification"} 1.0' in metrics
    assert "the gate refuses classification version smoke-1: it is a smoke run" in caplog.text


def test_floors_are_settings_and_a_model_below_them_does_not_serve(serve, registry_dir):
    with serve(registry_dir, GATE_MIN_ACCURACY=0.95) as client:
        assert client.get("/readyz").status_code == 503
        models = client.get("/models").json()
        metrics = client.get("/metrics").text
    assert models["models"][TASK_CLASSIFICATION] is None
    assert models["gate"] == {"min_accuracy": 0.95, "min_dice": 0.7, "min_eval_images": 50}
    assert models["gate_refused"][TASK_CLASSIFICATION] == {
        "v1": "its test accuracy 0.900 is below GATE_MIN_ACCURACY=0.95"
    }
    assert 'busi_model_gate_refusals_total{reason="accuracy",task="classification"} 1.0' in metrics


def test_metrics_from_too_few_images_or_none_fail_the_gate(registry_dir, publish_tiny):
    few = publish_tiny(registry_dir, TASK_SEGMENTATION, "few", promote=False,
                       metrics={"test": {"lesion_dice": 0.95, "n_lesion_images": 3}})  # fmt: skip
    none = publish_tiny(registry_dir, TASK_SEGMENTATION, "none", promote=False, metrics={})
    floors = GateFloors()
    assert [r.reason for r in gate_refusals(few.manifest, floors, TASK_SEGMENTATION)] == [
        "eval_images"
    ]
    assert [r.reason for r in gate_refusals(none.manifest, floors, TASK_SEGMENTATION)] == [
        "no_metrics"
    ]


def test_demote_falls_back_to_the_version_promoted_before(serve, registry_dir, publish_tiny):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2")
    model_dir = ["--model-dir", str(registry_dir)]
    with serve(registry_dir, RELOAD_INTERVAL_S=0.05) as client:
        assert served(client) == "v2"
        assert promote_cli.main("demote", [TASK_CLASSIFICATION, *model_dir]) == 0
        wait_for(lambda: served(client) == "v1")
        assert promote_cli.main("demote", [TASK_CLASSIFICATION, "v2", *model_dir]) == 1  # gone
        assert client.get("/readyz").status_code == 200
    record = read_promotions(registry_dir)
    assert record.stack(TASK_CLASSIFICATION) == ("v1",)
    actions = [(e["action"], e["task"], e["version"]) for e in record.history]
    assert actions[-1] == ("demote", TASK_CLASSIFICATION, "v2")
    assert record.history[-1]["previous"] == "v2" and record.history[-1]["serving"] == "v1"
    assert all(e["by"] and e["at"] for e in record.history)


def test_demoting_the_last_promotion_stops_serving_the_task(serve, registry_dir):
    with serve(registry_dir, RELOAD_INTERVAL_S=0.05) as client:
        assert (
            promote_cli.main("demote", [TASK_SEGMENTATION, "--model-dir", str(registry_dir)]) == 0
        )
        wait_for(lambda: served(client, TASK_SEGMENTATION) is None)
        assert client.get("/readyz").status_code == 503
        assert client.post("/segment", content=png(), headers=HEADERS).status_code == 503
        assert client.post("/classify", content=png(), headers=HEADERS).status_code == 200


def test_no_promotions_record_serves_nothing(serve, tmp_path, publish_tiny, caplog):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1", promote=False)
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1", promote=False)
    with caplog.at_level(logging.ERROR), serve(tmp_path) as client:
        assert client.get("/readyz").status_code == 503
    assert f"no {PROMOTIONS_FILE} in {tmp_path}: no version is promoted" in caplog.text


def test_a_pin_needs_no_promotion_but_passes_the_gate(serve, registry_dir, publish_tiny):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2", promote=False)
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "smoke-1", promote=False, **SMOKE)
    with serve(registry_dir, CLASSIFICATION_VERSION="v2") as client:
        assert served(client) == "v2"
    with serve(registry_dir, CLASSIFICATION_VERSION="smoke-1") as client:
        assert served(client) is None
        assert client.get("/models").json()["gate_refused"][TASK_CLASSIFICATION] == {
            "smoke-1": "it is a smoke run"
        }


def test_promote_from_a_candidates_directory_copies_then_promotes(tmp_path, publish_tiny):
    candidates, served_dir = tmp_path / "runs" / "candidate-models", tmp_path / "models"
    info = publish_tiny(candidates, TASK_SEGMENTATION, "c1", promote=False)
    argv = [TASK_SEGMENTATION, "c1", "--model-dir", str(served_dir), "--from", str(candidates)]
    assert promote_cli.main("promote", [*argv, "--reason", "beats v1 on CV"]) == 0
    copied = verify_artifact(served_dir, TASK_SEGMENTATION, "c1")
    assert (copied.path / "metadata.json").read_bytes() == (
        info.path / "metadata.json"
    ).read_bytes()
    record = json.loads((served_dir / PROMOTIONS_FILE).read_text())
    assert record["promoted"] == {TASK_SEGMENTATION: ["c1"]}
    assert record["history"][0]["reason"] == "beats v1 on CV"
    assert read_promotions(candidates) is None  # the candidates directory is left as it was


def test_promoting_a_missing_version_or_demoting_an_unpromoted_one_is_refused(registry_dir):
    from shared.errors import ArtifactNotFoundError
    from shared.promotion import demote, promote

    with pytest.raises(ArtifactNotFoundError):
        promote(registry_dir, TASK_CLASSIFICATION, "v9", GateFloors())
    with pytest.raises(PromotionRefusedError, match="no diagnosis version is promoted"):
        demote(registry_dir, TASK_DIAGNOSIS)


def test_gate_floors_come_from_the_environment_for_the_command_line():
    floors = GateFloors.from_env({"GATE_MIN_ACCURACY": "0.8", "GATE_MIN_DICE": ""})
    assert floors == GateFloors(min_accuracy=0.8)


def test_the_shipped_models_are_promoted_and_pass_the_default_gate():
    from pathlib import Path

    models = Path(__file__).resolve().parents[2] / "models"
    record = read_promotions(models)
    assert record is not None
    for task in TASKS:
        version = record.serving(task)
        assert version, f"no shipped {task} version is promoted"
        info = verify_artifact(models, task, version)
        assert gate_refusals(info.manifest, GateFloors(), task) == []
