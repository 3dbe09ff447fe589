"""?frame=all: every frame of a cine loop analysed in batched forwards, the key frame, the cap.

The tiny rigged models of tests/conftest.py: a dark frame is normal without lesion pixels, a scan
is benign with its bright rectangle outlined; a larger rectangle makes a larger lesion.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from dicom_support import header, pacs_dicom, pydicom_file, seg_mask
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from service_inputs import dicom, png, scan, uniform

DICOM = {"Content-Type": "application/dicom"}


def big_lesion() -> np.ndarray:
    pixels = scan()
    pixels[10:60, 20:80] = 230
    return pixels


FRAMES = [uniform(10, 96, 80), scan(), big_lesion(), uniform(10, 96, 80)]


def mask_of(body_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body_b64))))


def inferences(client: TestClient) -> float:
    text = client.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('busi_stage_duration_seconds_count{stage="inference"')
    )


def single(client: TestClient, endpoint: str, data: bytes, frame: int) -> dict:
    response = client.post(f"{endpoint}?frame={frame}", content=data, headers=DICOM)
    assert response.status_code == 200, response.text
    return response.json()


def test_segment_all_frames_gives_each_area_and_the_largest_lesion_in_one_forward(
    client: TestClient,
) -> None:
    data = dicom(FRAMES)
    before = inferences(client)
    response = client.post("/segment?frame=all", content=data, headers=DICOM)
    assert response.status_code == 200, response.text
    assert inferences(client) - before == 1  # four frames, one batched forward
    body = response.json()
    cine = body["cine"]
    assert [f["frame"] for f in cine["frames"]] == [0, 1, 2, 3]
    assert all(f["label"] is None and f["probabilities"] is None for f in cine["frames"])
    areas = [f["lesion_area_fraction"] for f in cine["frames"]]
    assert areas == [
        pytest.approx(single(client, "/segment", data, k)["lesion_area_fraction"]) for k in range(4)
    ]
    assert areas[0] == areas[3] == 0 and 0 < areas[1] < areas[2]
    assert cine["largest_lesion_frame"] == cine["key_frame"] == 2
    # the rest of the answer is the key frame's, as ?frame=2 gives it
    assert body["image"]["frame"] == 2 and body["image"]["n_frames"] == 4
    expected = single(client, "/segment", data, 2)
    np.testing.assert_array_equal(mask_of(body["mask_png"]), mask_of(expected["mask_png"]))
    assert body["bbox"] == expected["bbox"]


def test_diagnose_all_frames_labels_every_frame_and_segments_only_lesions(
    client: TestClient,
) -> None:
    data = pacs_dicom(FRAMES)
    body = client.post("/diagnose?frame=all", content=data, headers=DICOM).json()
    frames = body["cine"]["frames"]
    for k, result in enumerate(frames):
        expected = single(client, "/diagnose", data, k)
        assert result["label"] == expected["classification"]["label"]
        assert result["probabilities"] == pytest.approx(
            expected["classification"]["probabilities"], abs=1e-6
        )
        if expected["segmentation"] is None:
            assert result["lesion_area_fraction"] is None
        else:
            assert result["lesion_area_fraction"] == pytest.approx(
                expected["segmentation"]["lesion_area_fraction"]
            )
    assert [f["label"] for f in frames][0] == "normal"
    assert frames[0]["lesion_area_fraction"] is None
    assert body["cine"]["key_frame"] == 2
    assert body["classification"]["label"] == frames[2]["label"]
    assert body["source"]["frame"] == 2
    assert body["source"]["sop_instance_uid"] == header(data).SOPInstanceUID


def test_classify_all_frames_keys_on_the_frame_most_likely_a_lesion(client: TestClient) -> None:
    data = dicom([uniform(10, 96, 80), scan(), uniform(10, 96, 80)])
    body = client.post("/classify?frame=all", content=data, headers=DICOM).json()
    frames = body["cine"]["frames"]
    assert [f["label"] for f in frames] == ["normal", "benign", "normal"]
    assert all(f["lesion_area_fraction"] is None for f in frames)
    assert body["cine"]["largest_lesion_frame"] is None
    assert body["cine"]["key_frame"] == body["image"]["frame"] == 1
    assert body["label"] == "benign"


def test_a_real_cine_loop_is_analysed_in_batches(client: TestClient) -> None:
    data = pydicom_file("examples_ybr_color.dcm")  # 30 frames, JPEG baseline, YBR
    before = inferences(client)
    response = client.post("/segment?frame=all", content=data, headers=DICOM)
    assert response.status_code == 200, response.text
    assert inferences(client) - before == 2  # 16 + 14 frames
    cine = response.json()["cine"]
    assert [f["frame"] for f in cine["frames"]] == list(range(30))
    key = cine["key_frame"]
    areas = [f["lesion_area_fraction"] for f in cine["frames"]]
    assert areas[key] == max(areas)
    expected = single(client, "/segment", data, key)
    assert areas[key] == pytest.approx(expected["lesion_area_fraction"])


def test_a_loop_longer_than_the_cap_is_a_422_naming_the_cap(serve, tiny_model_dir) -> None:
    with serve(tiny_model_dir, MAX_CINE_FRAMES=3) as client:
        before = inferences(client)
        over = client.post("/segment?frame=all", content=dicom(FRAMES), headers=DICOM)
        at_cap = client.post("/segment?frame=all", content=dicom(FRAMES[:3]), headers=DICOM)
        one = client.post("/segment?frame=3", content=dicom(FRAMES), headers=DICOM)
        assert inferences(client) - before == 2  # the refused loop ran no model
    assert over.status_code == 422
    error = over.json()["error"]
    assert error["code"] == "too_many_frames"
    assert "3" in error["message"] and "MAX_CINE_FRAMES" in error["message"]
    assert at_cap.status_code == 200 and one.status_code == 200


def test_frame_all_on_a_png_is_its_one_frame(client: TestClient) -> None:
    response = client.post(
        "/diagnose?frame=all", content=png(), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    cine = response.json()["cine"]
    assert [f["frame"] for f in cine["frames"]] == [0] and cine["key_frame"] == 0


@pytest.mark.parametrize("frame", ["-1", "some", "1.5"])
def test_a_frame_that_is_no_index_nor_all_is_a_422(client: TestClient, frame: str) -> None:
    response = client.post(f"/classify?frame={frame}", content=dicom(FRAMES), headers=DICOM)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_dicom_answer_of_all_frames_is_the_seg_of_the_key_frame(client: TestClient) -> None:
    data = pacs_dicom(FRAMES)
    response = client.post(
        "/segment?frame=all", content=data, headers={**DICOM, "Accept": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    seg = dcmread(io.BytesIO(response.content))
    item = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert item.SourceImageSequence[0].ReferencedFrameNumber == 3  # frame 2, 1-based
    expected = mask_of(single(client, "/segment", data, 2)["mask_png"]) > 0
    np.testing.assert_array_equal(seg_mask(seg, header(data), 2), expected)
