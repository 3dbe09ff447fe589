"""The response layer: Accept negotiation (q-values), the source UIDs in every JSON answer, and
the raw results the predictor hands it (the mask as an array, the DICOM header kept)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dicom_support import header, pacs_dicom
from fastapi.testclient import TestClient
from PIL import Image
from service_inputs import jpeg, png, scan, uniform

from service.dicom.builders import DicomOutputNeedsDicomInputError
from service.predictors import ImageRequest
from service.presentation import (
    CLASSIFY_OFFERS,
    DIAGNOSE_OFFERS,
    SEGMENT_OFFERS,
    choose,
)

DICOM = {"Content-Type": "application/dicom"}
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", "application/json"),
        ("image/png", "image/png"),
        ("image/png, application/json", "image/png"),  # equal q: the client's order
        ("application/json, image/png", "application/json"),
        ("application/json;q=0.5, image/png;q=0.9", "image/png"),  # q decides before order
        ("image/png;q=0.1, application/json", "application/json"),
        ("*/*", "application/json"),  # equal q, same range: the endpoint's order
        ("application/*", "application/json"),
        ("image/*", "image/png"),
        ("application/json;q=0, */*", "image/png"),  # q=0: not acceptable
        ("application/dicom;q=0.8, image/png;q=0.3", "application/dicom"),
        ("text/html", "application/json"),  # nothing offered is acceptable: the default
        ("image/png;q=abc, application/json", "application/json"),  # a bad q drops the range
        ("image/png;q=2, application/json", "application/json"),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", "application/dicom"),
    ],
)
def test_segment_negotiation_honours_q_values_then_client_order(accept: str, chosen: str) -> None:
    assert choose(accept, SEGMENT_OFFERS, input_is_dicom=True).media_type == chosen


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("application/dicom", "application/dicom"),
        (f"{MULTIPART_DICOM}; transfer-syntax=*", MULTIPART_DICOM),  # as DICOMweb clients send
        ('multipart/related; type="application/dicom+xml"', "application/json"),
        ("image/png", "application/json"),  # /diagnose has no PNG answer
    ],
)
def test_diagnose_negotiation_matches_the_multipart_type_parameter(
    accept: str, chosen: str
) -> None:
    assert choose(accept, DIAGNOSE_OFFERS, input_is_dicom=True).media_type == chosen


def test_a_dicom_answer_for_a_png_falls_back_to_an_acceptable_json_or_is_a_406() -> None:
    fallback = choose("application/dicom, application/json;q=0.1", SEGMENT_OFFERS, False)
    assert fallback.media_type == "application/json"
    with pytest.raises(DicomOutputNeedsDicomInputError):
        choose("application/dicom", SEGMENT_OFFERS, input_is_dicom=False)
    assert choose("application/dicom", CLASSIFY_OFFERS, False).media_type == "application/json"


def test_segment_honours_q_values_end_to_end(client: TestClient) -> None:
    response = client.post(
        "/segment",
        content=png(),
        headers={"Content-Type": "image/png", "Accept": "application/json;q=0.2, image/png"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["Vary"] == "Accept"
    assert response.headers["X-Frame"] == "0"
    assert Image.open(io.BytesIO(response.content)).size == (96, 80)


@pytest.mark.parametrize("endpoint", ["/classify", "/segment", "/diagnose"])
def test_json_answers_echo_the_source_uids_and_the_analysed_frame(
    client: TestClient, endpoint: str
) -> None:
    data = pacs_dicom([uniform(10, 96, 80), scan()])
    source = header(data)
    response = client.post(f"{endpoint}?frame=1", content=data, headers=DICOM)
    assert response.status_code == 200, response.text
    assert response.json()["source"] == {
        "study_instance_uid": source.StudyInstanceUID,
        "series_instance_uid": source.SeriesInstanceUID,
        "sop_instance_uid": source.SOPInstanceUID,
        "sop_class_uid": source.SOPClassUID,
        "frame": 1,
    }
    assert response.json()["cine"] is None


@pytest.mark.parametrize("make", [png, jpeg], ids=["png", "jpeg"])
def test_png_and_jpeg_answers_have_no_source(client: TestClient, make) -> None:
    for endpoint in ("/classify", "/segment", "/diagnose"):
        response = client.post(endpoint, content=make())
        assert response.status_code == 200
        assert response.json()["source"] is None


def test_a_dicom_without_study_uid_has_a_source_with_nulls(client: TestClient) -> None:
    from service_inputs import dicom

    data = dicom()
    response = client.post("/classify", content=data, headers=DICOM)
    assert response.status_code == 200
    source = response.json()["source"]
    assert source["study_instance_uid"] is None and source["series_instance_uid"] is None
    assert source["sop_instance_uid"] == header(data).SOPInstanceUID


def test_predictor_returns_the_mask_as_an_array_and_keeps_the_dicom_header(
    client: TestClient,
) -> None:
    data = pacs_dicom(pixel_spacing=(0.2, 0.2))
    predictor = client.app.state.runtime.predictor
    analysis = predictor.segment(ImageRequest(data=data))
    mask = analysis.segmentation.mask
    assert mask.shape == (80, 96) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    kept = analysis.image.dicom
    assert kept.SOPInstanceUID == header(data).SOPInstanceUID
    assert [float(v) for v in kept.PixelSpacing] == [0.2, 0.2]
    assert "PixelData" not in kept  # the header only: the pixels are analysis.image.pixels
    assert analysis.image.pixels.shape == (80, 96)
    assert predictor.segment(ImageRequest(data=png())).image.dicom is None
