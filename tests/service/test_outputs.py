"""What a clinician can weigh: calibrated probabilities, the quality flag, the uncertain band,
and DICOM objects that are not ultrasound images refused before any model runs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from service_inputs import dicom, png, uniform
from synthetic_scans import speckle_scan

from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.postprocessing import softmax
from shared.quality import OodDetector, image_statistics

CLASSIFY_PNG = {"Content-Type": "image/png"}
CLASSES = ("normal", "benign", "malignant")


@pytest.fixture(scope="module")
def scan_detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector fitted on synthetic speckle scans, so a synthetic scan is in distribution."""
    features = np.stack([image_statistics(speckle_scan(seed)) for seed in range(40)])
    path = tmp_path_factory.mktemp("detector") / "detector.json"
    OodDetector.fit(features, quantile=1.0).save(path)
    return path


@pytest.fixture
def calibrated_dir(tmp_path: Path, publish_tiny) -> Path:
    """Separate models; the classifier's manifest declares temperature 4 and uncertain_below."""
    output = {"type": "logits", "shape": [3], "calibrated": True, "temperature": 4.0,
              "uncertain_below": 0.6}  # fmt: skip
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "c1", output=output)
    publish_tiny(tmp_path, TASK_SEGMENTATION, "s1")
    return tmp_path


def raw_logits(client, image: np.ndarray) -> np.ndarray:
    """The tiny classifier's logits for `image`, read back from an uncalibrated response."""
    body = client.post("/classify", content=png(image), headers=CLASSIFY_PNG).json()
    return np.log([body["probabilities"][c] for c in ("normal", "benign", "malignant")])


def test_every_inference_response_carries_quality(client):
    for endpoint in ("/classify", "/segment", "/diagnose"):
        response = client.post(endpoint, content=png(), headers=CLASSIFY_PNG)
        assert response.status_code == 200, endpoint
        quality = response.json()["quality"]
        assert set(quality) == {"in_distribution", "score", "reasons"}
        assert quality["score"] >= 0


def test_blank_image_is_flagged_and_its_label_marked_unreliable_but_still_answered(client):
    response = client.post("/diagnose", content=png(uniform(0)), headers=CLASSIFY_PNG)
    assert response.status_code == 200
    body = response.json()
    assert body["quality"]["in_distribution"] is False
    assert body["quality"]["score"] > 1 and body["quality"]["reasons"]
    assert body["classification"]["label"] in ("normal", "benign", "malignant")
    assert body["classification"]["reliable"] is False


def test_scan_like_image_is_in_distribution_and_reliable(serve, tiny_model_dir, scan_detector_file):
    with serve(tiny_model_dir, OOD_DETECTOR_FILE=scan_detector_file, UNCERTAIN_BELOW=0) as client:
        body = client.post("/classify", content=png(speckle_scan(123)), headers=CLASSIFY_PNG).json()
        flagged = client.post("/classify", content=png(uniform(255)), headers=CLASSIFY_PNG).json()
    assert body["quality"] == {"in_distribution": True, "score": pytest.approx(
        body["quality"]["score"]), "reasons": []}  # fmt: skip
    assert body["quality"]["score"] <= 1
    assert body["reliable"] is True and body["uncertain"] is False
    assert flagged["quality"]["in_distribution"] is False and flagged["reliable"] is False


def test_segment_png_answer_carries_the_quality_verdict_in_headers(client):
    response = client.post(
        "/segment", content=png(uniform(0)), headers={**CLASSIFY_PNG, "Accept": "image/png"}
    )
    assert response.status_code == 200
    assert response.headers["X-In-Distribution"] == "false"
    assert float(response.headers["X-Quality-Score"]) > 1


def test_declared_temperature_is_applied_and_reported(serve, tiny_model_dir, calibrated_dir):
    image = uniform(200)  # the tiny classifier is confident ("malignant") on bright images
    with serve(tiny_model_dir) as client:
        logits = raw_logits(client, image)
    with serve(calibrated_dir) as client:
        body = client.post("/classify", content=png(image), headers=CLASSIFY_PNG).json()
        models = client.get("/models").json()["models"]
    expected = softmax(logits / 4.0)
    got = [body["probabilities"][c] for c in ("normal", "benign", "malignant")]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert body["calibrated"] is True
    assert body["label"] == "malignant"  # a temperature never changes the label
    assert models["classification"]["calibration"] == {
        "calibrated": True, "method": "temperature", "temperature": 4.0, "uncertain_below": 0.6,
    }  # fmt: skip
    assert models["segmentation"]["calibration"] is None


def test_uncalibrated_artifact_says_so(client):
    body = client.post("/classify", content=png(), headers=CLASSIFY_PNG).json()
    assert body["calibrated"] is False
    described = client.get("/models").json()["models"]["classification"]["calibration"]
    assert described["calibrated"] is False and described["method"] == "none"
    assert described["temperature"] == 1.0


def test_uncertain_band_uses_the_artifact_threshold_unless_the_setting_overrides(
    serve, calibrated_dir
):
    image = uniform(115)  # mid-grey: the tiny classifier leans "benign" without conviction
    with serve(calibrated_dir) as client:
        body = client.post("/classify", content=png(image), headers=CLASSIFY_PNG).json()
    top = max(body["probabilities"].values())
    assert top < 0.6
    assert body["uncertain"] is True and body["reliable"] is False
    with serve(calibrated_dir, UNCERTAIN_BELOW=0.0) as client:
        body = client.post("/classify", content=png(image), headers=CLASSIFY_PNG).json()
        described = client.get("/models").json()["models"]["classification"]["calibration"]
    assert body["uncertain"] is False
    assert described["uncertain_below"] == 0.0


def test_malformed_temperature_refuses_the_artifact(
    serve, tmp_path, publish_tiny, tiny_model_files
):
    from tiny_manifests import classification_metadata, promote_unchecked, write_unchecked_artifact

    from shared.manifest import ManifestError

    bad = {"type": "logits", "shape": [3], "temperature": -1.0}
    with pytest.raises(ManifestError, match="temperature must be a positive number"):
        publish_tiny(tmp_path, TASK_CLASSIFICATION, "bad", output=bad)
    # written around publish's validation and promoted by hand: the service refuses it too
    manifest = {**classification_metadata(), "output": bad}
    model_file = tiny_model_files[TASK_CLASSIFICATION]
    write_unchecked_artifact(tmp_path, TASK_CLASSIFICATION, "bad", model_file, manifest)
    promote_unchecked(tmp_path, TASK_CLASSIFICATION, "bad")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "s1")
    with serve(tmp_path) as client:
        assert client.get("/readyz").status_code == 503


def ct_dicom() -> bytes:
    ds = dcmread(io.BytesIO(dicom()))
    ds.Modality = "CT"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_non_ultrasound_dicom_is_a_422_before_any_model_runs(client):
    def inferences() -> float:
        text = client.get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('busi_stage_duration_seconds_count{stage="inference"')
        )

    before = inferences()
    response = client.post(
        "/classify", content=ct_dicom(), headers={"Content-Type": "application/dicom"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "not_ultrasound"
    assert "CT" not in response.json()["error"]["message"]  # no tag values in messages
    assert inferences() == before


def test_setting_allows_non_ultrasound_dicom(serve, tiny_model_dir):
    with serve(tiny_model_dir, ALLOW_NON_ULTRASOUND_DICOM=True) as client:
        response = client.post(
            "/classify", content=ct_dicom(), headers={"Content-Type": "application/dicom"}
        )
        report = client.post(
            "/classify",
            content=dicom(with_pixels=False),
            headers={"Content-Type": "application/dicom"},
        )
    assert response.status_code == 200
    assert report.status_code == 422 and report.json()["error"]["code"] == "no_pixel_data"


def test_joint_artifact_declaring_a_temperature_in_its_classes_is_calibrated(serve, tmp_path):
    import torch
    from test_joint_model import TinyJoint, joint_metadata

    from shared.labels import TASK_DIAGNOSIS
    from shared.promotion import GateFloors, promote
    from shared.store import publish_artifact

    model_file = tmp_path / "joint.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    plain, calibrated = joint_metadata(), joint_metadata()
    calibrated["output"]["classes"].update(calibrated=True, temperature=3.0)
    for folder, metadata in (("plain", plain), ("calibrated", calibrated)):
        publish_artifact(tmp_path / folder, TASK_DIAGNOSIS, "j1", model_file, metadata)
        promote(tmp_path / folder, TASK_DIAGNOSIS, "j1", GateFloors())
    image = png(uniform(220))
    with serve(tmp_path / "plain") as client:
        raw = client.post("/diagnose", content=image, headers=CLASSIFY_PNG).json()
    with serve(tmp_path / "calibrated") as client:
        body = client.post("/diagnose", content=image, headers=CLASSIFY_PNG).json()
        described = client.get("/models").json()["models"]["diagnosis"]["calibration"]
    logits = np.log([raw["classification"]["probabilities"][c] for c in CLASSES])
    got = [body["classification"]["probabilities"][c] for c in CLASSES]
    np.testing.assert_allclose(got, softmax(logits / 3.0), rtol=1e-5)
    assert raw["classification"]["calibrated"] is False
    assert body["classification"]["calibrated"] is True
    assert described["method"] == "temperature" and described["temperature"] == 3.0
