"""The reproducers of issue 12 against the running app: client input is a 4xx, never a 5xx."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from service_inputs import dicom, png, png_declaring, scan
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


def _multipart_with_rfc2231_name(data: bytes, content_type: bytes = b"image/png") -> bytes:
    return (
        b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
        b"filename*=UTF-8''%C3%A9chographie.png\r\nContent-Type: " + content_type + b"\r\n\r\n"
        + data + b"\r\n--xyz--\r\n"
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_a_multipart_upload_named_with_filename_star_is_analysed(client, kind):
    data = png() if kind == "png" else dicom(scan())
    expected = client.post("/classify", files={"file": ("scan", data, "application/octet-stream")})
    response = client.post(
        "/classify",
        content=_multipart_with_rfc2231_name(data, b"application/octet-stream"),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["probabilities"] == expected.json()["probabilities"]


def test_multipart_without_a_boundary_is_a_documented_400(client):
    response = client.post(
        "/classify", content=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(response, 400, "bad_request")
