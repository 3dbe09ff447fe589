"""Which artifact serves: promoted or pinned, verified and warmed, and refusals that keep us up."""

from __future__ import annotations

import logging

import pytest
from service_inputs import png
from tiny_manifests import classification_metadata, promote_unchecked, write_unchecked_artifact

from shared.errors import ArtifactNotFoundError
from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION
from shared.manifest import ManifestError
from shared.store import list_versions


@pytest.fixture
def registry_dir(tmp_path, publish_tiny):
    """A registry with v1 of both tasks, which a test may add to."""
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
    return tmp_path


def corrupt(info) -> None:
    with info.model_path.open("ab") as fh:
        fh.write(b"tampered")


def test_the_last_promoted_version_is_served_not_the_newest(serve, registry_dir, publish_tiny):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2", created_at="2026-02-01T00:00:00+00:00")
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v0", created_at="2025-12-01T00:00:00+00:00")
    publish_tiny(  # the newest, a candidate nobody promoted
        registry_dir, TASK_CLASSIFICATION, "v3", created_at="2026-03-01T00:00:00+00:00",
        promote=False,
    )  # fmt: skip
    with serve(registry_dir) as client:
        response = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 200
        assert response.json()["model"]["version"] == "v0"
        assert client.get("/readyz").json()["models"] == {
            TASK_CLASSIFICATION: True,
            TASK_SEGMENTATION: True,
            TASK_DIAGNOSIS: False,
        }
        assert client.get("/models").json()["promoted"] == {
            TASK_CLASSIFICATION: "v0",
            TASK_SEGMENTATION: "v1",
            TASK_DIAGNOSIS: None,
        }


def test_pinned_version_is_served(serve, registry_dir, publish_tiny):
    publish_tiny(registry_dir, TASK_CLASSIFICATION, "v2", created_at="2026-02-01T00:00:00+00:00")
    with serve(registry_dir, CLASSIFICATION_VERSION="v1") as client:
        response = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 200
        assert response.json()["model"]["version"] == "v1"


def test_unsafe_pin_is_rejected_by_the_settings(registry_dir):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError):
        Settings(MODEL_DIR=registry_dir, CLASSIFICATION_VERSION="../v1")


def test_corrupt_artifact_is_refused_at_start_up_and_the_service_stays_up(
    serve, tmp_path, publish_tiny, caplog
):
    corrupt(publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1"))
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
    with caplog.at_level(logging.INFO), serve(tmp_path) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "loading",
            "models": {TASK_CLASSIFICATION: False, TASK_SEGMENTATION: True, TASK_DIAGNOSIS: False},
        }
        response = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_unavailable"
        assert response.json()["error"]["request_id"] == response.headers["X-Request-ID"]
        assert response.headers["Retry-After"]
        assert (
            client.post(
                "/segment", content=png(), headers={"Content-Type": "image/png"}
            ).status_code
            == 200
        )
        metrics = client.get("/metrics").text
    assert (
        "refusing classification version v1: classification version v1 fails its checksum"
        in caplog.text
    )
    assert 'busi_model_reloads_total{outcome="rejected",task="classification"} 1.0' in metrics
    assert "busi_ready 0.0" in metrics


def test_corrupt_promoted_version_falls_back_to_the_one_promoted_before(
    serve, registry_dir, publish_tiny
):
    corrupt(
        publish_tiny(
            registry_dir, TASK_CLASSIFICATION, "v2", created_at="2026-02-01T00:00:00+00:00"
        )
    )
    with serve(registry_dir) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/models").json()["models"][TASK_CLASSIFICATION]["version"] == "v1"


def test_artifact_whose_output_disagrees_with_its_manifest_is_refused(
    serve, tmp_path, publish_tiny, caplog
):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(
        tmp_path,
        TASK_SEGMENTATION,
        "v1",
        output={"type": "logits", "shape": [1, 32, 32], "threshold": 0.5},
    )
    with caplog.at_level(logging.INFO), serve(tmp_path) as client:
        assert client.get("/readyz").status_code == 503
        metrics = client.get("/metrics").text
    assert (
        "the warm-up forward returned [1, 1, 64, 64], the manifest declares [1, 1, 32, 32]"
        in caplog.text
    )
    assert 'busi_model_reloads_total{outcome="failed",task="segmentation"} 1.0' in metrics


def test_model_that_fails_its_warm_up_is_refused(serve, tmp_path, publish_tiny, caplog):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1", model="broken-segmentation")
    with caplog.at_level(logging.INFO), serve(tmp_path) as client:
        assert client.get("/readyz").status_code == 503
    assert "refusing segmentation version v1: the warm-up forward failed" in caplog.text


def test_empty_model_dir_starts_not_ready_with_a_clear_log_line(serve, tmp_path, caplog):
    with caplog.at_level(logging.INFO), serve(tmp_path / "missing") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        response = client.post("/diagnose", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 503
    assert "no promotions.json in" in caplog.text
    assert "python -m training promote <task> <version>" in caplog.text
    assert "not ready" in caplog.text


def test_pin_to_a_missing_version_fails_the_start_up_with_a_clear_message(serve, registry_dir):
    with pytest.raises(ArtifactNotFoundError, match="SEGMENTATION_VERSION pins segmentation v"):
        with serve(registry_dir, SEGMENTATION_VERSION="v9"):
            pass


def test_pins_are_shown_by_models_and_no_version_by_readyz(serve, registry_dir):
    with serve(registry_dir, SEGMENTATION_VERSION="v1") as client:
        ready = client.get("/readyz").json()
        models = client.get("/models").json()
    assert models["pins"][TASK_SEGMENTATION] == "v1" and models["pins"][TASK_CLASSIFICATION] is None
    assert models["fallback"] == {}
    assert "pins" not in ready and "v1" not in str(ready)  # versions only with a key


def test_unloadable_promoted_version_falls_back_to_the_one_before_after_a_restart(
    serve, registry_dir, publish_tiny, caplog
):
    # A restarted replica never saw v1 serve; v2 verifies (good checksum) but fails its warm-up.
    publish_tiny(
        registry_dir,
        TASK_SEGMENTATION,
        "v2",
        model="broken-segmentation",
        created_at="2026-02-01T00:00:00+00:00",
    )
    with caplog.at_level(logging.INFO), serve(registry_dir) as client:
        assert client.get("/readyz").status_code == 200
        models = client.get("/models").json()
        metrics = client.get("/metrics").text
    assert models["models"][TASK_SEGMENTATION]["version"] == "v1"
    assert models["fallback"] == {TASK_SEGMENTATION: "v2"}
    assert 'busi_model_fallback{task="segmentation"} 1.0' in metrics
    assert 'busi_model_reloads_total{outcome="failed",task="segmentation"} 1.0' in metrics
    assert (
        "serving segmentation version v1: the promoted one, v2, could not be served" in caplog.text
    )


def test_manifest_with_a_field_of_the_wrong_type_is_refused_at_publish(tmp_path, publish_tiny):
    with pytest.raises(ManifestError, match="class_names must be an ordering of"):
        publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1", class_names=5)
    assert list_versions(tmp_path, TASK_CLASSIFICATION) == []  # nothing was written


def test_manifest_with_a_field_of_the_wrong_type_is_counted_as_a_failed_load(
    serve, tmp_path, publish_tiny, tiny_model_files, caplog
):
    # written around publish_artifact (another tool, an older release): the service still refuses
    manifest = {**classification_metadata(), "class_names": 5}
    write_unchecked_artifact(
        tmp_path, TASK_CLASSIFICATION, "v1", tiny_model_files[TASK_CLASSIFICATION], manifest
    )
    promote_unchecked(tmp_path, TASK_CLASSIFICATION, "v1")  # promote itself would refuse it
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
    with caplog.at_level(logging.INFO), serve(tmp_path) as client:
        assert client.get("/readyz").status_code == 503
        metrics = client.get("/metrics").text
    assert 'busi_model_reloads_total{outcome="failed",task="classification"} 1.0' in metrics
    assert "invalid manifest: class_names must be an ordering of" in caplog.text


def test_odd_folder_names_are_logged_once_per_name(tmp_path, caplog):
    for name in ("bad name", "also..bad"):
        (tmp_path / TASK_SEGMENTATION / name).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="shared.store"):
        for _ in range(5):  # five polls
            assert list_versions(tmp_path, TASK_SEGMENTATION) == []
    warnings = [r for r in caplog.records if "invalid version name" in r.getMessage()]
    assert len(warnings) == 2
