"""The reproducers of issue 12 against the running app: client input is a 4xx, never a 5xx."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from service_inputs import dicom, png_declaring, scan
from test_bad_input import assert_error


def _dicom_with(**elements) -> bytes:
    import io

    from pydicom import dcmwrite

    ds = dcmread(io.BytesIO(dicom(scan())))
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(("width", "height"), [(8, 1_000_000), (8, 5_000_000)])
def test_a_thin_strip_png_is_refused_from_its_header(client, width, height):
    response = client.post(
        "/classify", content=png_declaring(width, height), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "image_too_large")


@pytest.mark.parametrize("slope", ["NaN", "inf", "0"])
def test_a_non_finite_or_zero_rescale_slope_is_a_422(client, slope):
    data = _dicom_with(RescaleSlope=slope, RescaleIntercept="0")
    response = client.post("/diagnose", content=data, headers={"Content-Type": "application/dicom"})
    error = assert_error(response, 422, "invalid_dicom_value")
    assert "RescaleSlope" in error["message"]


def test_a_malformed_number_of_frames_is_a_400(client):
    one_frame = dicom([scan()])  # NumberOfFrames "1 " as written; pydicom will not write "1A"
    data = one_frame.replace(b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x001A")
    assert data != one_frame
    response = client.post("/classify", content=data, headers={"Content-Type": "application/dicom"})
    error = assert_error(response, 400, "corrupt_image")
    assert "NumberOfFrames" in error["message"]


def test_frame_out_of_range_says_how_many_frames_there_are(client):
    data = dicom([scan(), scan(), scan()])
    response = client.post(
        "/classify?frame=3", content=data, headers={"Content-Type": "application/dicom"}
    )
    error = assert_error(response, 422, "frame_out_of_range")
    assert "3 frames" in error["message"]
