"""Bad input gets a 4xx with the one error envelope, never a 5xx or a stack trace."""

from __future__ import annotations

import pytest
from service_inputs import dicom, jpeg, png, png_declaring, uniform


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text and ".py" not in response.text
    assert "/tmp" not in response.text and "/work" not in response.text
    return error


@pytest.mark.parametrize("endpoint", ["/classify", "/segment", "/diagnose"])
def test_empty_body_is_a_400(client, endpoint):
    response = client.post(endpoint, content=b"", headers={"Content-Type": "image/png"})
    assert_error(response, 400, "empty_input")


def test_empty_multipart_file_is_a_400(client):
    response = client.post("/classify", files={"file": ("scan.png", b"", "image/png")})
    assert_error(response, 400, "empty_input")


def test_multipart_without_a_file_part_is_a_400(client):
    response = client.post("/classify", data={"image": "nope"}, files={"other": ("x", b"1")})
    assert_error(response, 400, "missing_file")


def test_classify_rejects_truncated_png(client):
    data = png()
    response = client.post(
        "/classify", content=data[: len(data) // 2], headers={"Content-Type": "image/png"}
    )
    assert_error(response, 400, "corrupt_image")


def test_text_file_named_png_is_a_415(client):
    files = {"file": ("notes.png", b"these are not pixels\n", "image/png")}
    response = client.post("/classify", files=files)
    assert_error(response, 415, "unsupported_format")


def test_declared_type_that_disagrees_with_the_bytes_is_a_415(client):
    response = client.post("/classify", content=jpeg(), headers={"Content-Type": "image/png"})
    error = assert_error(response, 415, "format_mismatch")
    assert "JPEG" in error["message"]


def test_multipart_part_type_that_disagrees_with_the_bytes_is_a_415(client):
    response = client.post("/classify", files={"file": ("scan.dcm", png(), "application/dicom")})
    assert_error(response, 415, "format_mismatch")


def test_unsupported_content_type_is_a_415(client):
    response = client.post("/classify", content=png(), headers={"Content-Type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type")


def test_decompression_bomb_is_rejected_without_decoding(client):
    response = client.post(
        "/classify", content=png_declaring(8000, 8000), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "image_too_large")


def test_one_pixel_image_is_too_small(client):
    response = client.post(
        "/classify", content=png(uniform(0, 1, 1)), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "image_too_small")


def test_dicom_structured_report_is_a_422_non_image(client):
    # Its SOP class says it is a report before the decoder would find it has no pixels.
    response = client.post(
        "/diagnose", content=dicom(with_pixels=False), headers={"Content-Type": "application/dicom"}
    )
    assert_error(response, 422, "non_image_dicom")


def test_frame_out_of_range_is_a_422(client):
    response = client.post(
        "/classify?frame=3",
        content=dicom([uniform(9), uniform(9)]),
        headers={"Content-Type": "application/dicom"},
    )
    assert_error(response, 422, "frame_out_of_range")


def test_frame_of_a_single_frame_png_beyond_0_is_a_422(client):
    response = client.post(
        "/classify?frame=1", content=png(), headers={"Content-Type": "image/png"}
    )
    assert_error(response, 422, "frame_out_of_range")


@pytest.mark.parametrize("frame", ["-1", "abc", "1.5"])
def test_invalid_frame_parameter_is_a_422(client, frame):
    response = client.post(
        f"/classify?frame={frame}", content=png(), headers={"Content-Type": "image/png"}
    )
    error = assert_error(response, 422, "invalid_request")
    assert frame not in error["message"]


def test_body_over_the_limit_by_content_length_is_a_413(serve, tiny_model_dir):
    with serve(tiny_model_dir, MAX_BODY_BYTES=1000) as small:
        response = small.post(
            "/classify", content=b"\0" * 1001, headers={"Content-Type": "image/png"}
        )
        assert_error(response, 413, "body_too_large")
        response = small.post("/classify", files={"file": ("a.png", b"\0" * 2000, "image/png")})
        assert_error(response, 413, "body_too_large")


def test_chunked_body_over_the_limit_is_a_413(serve, tiny_model_dir):
    def chunks():
        for _ in range(20):
            yield b"\x89PNG" + b"\0" * 96

    with serve(tiny_model_dir, MAX_BODY_BYTES=1000) as small:
        response = small.post("/classify", content=chunks(), headers={"Content-Type": "image/png"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_error(response, 413, "body_too_large")


def test_body_at_the_limit_is_accepted(serve, tiny_model_dir):
    data = png()
    with serve(tiny_model_dir, MAX_BODY_BYTES=len(data)) as exact:
        response = exact.post("/classify", content=data, headers={"Content-Type": "image/png"})
        assert response.status_code == 200


def test_default_body_limit_is_20_mib():
    from service.settings import Settings

    assert Settings().MAX_BODY_BYTES == 20 * 1024 * 1024


def test_unknown_path_is_a_404_envelope(client):
    assert_error(client.get("/nope"), 404, "not_found")


def test_wrong_method_is_a_405_envelope(client):
    response = client.get("/classify")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


def test_a_bug_is_a_generic_500_without_details(serve, tiny_model_dir, caplog):
    def add_buggy_route(app):
        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError("secret detail in /internal/path")

    with serve(tiny_model_dir, app_hook=add_buggy_route) as buggy:
        response = buggy.get("/boom")
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text
    assert error["message"] == "internal error; see the service log"
    assert "secret detail" in caplog.text  # the details go to the log only
