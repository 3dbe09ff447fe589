"""POST /classify, /segment, /diagnose: formats, transports, results."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from service_inputs import LESION, dicom, jpeg, png, scan, uniform

from shared.labels import CLASS_NAMES

FORMAT_BYTES = {"png": png, "jpeg": jpeg, "dicom": dicom}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}


def mask_of(body_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body_b64))))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_classify_accepts_each_format_as_raw_body(client, fmt):
    response = client.post(
        "/classify", content=FORMAT_BYTES[fmt](), headers={"Content-Type": MEDIA_TYPES[fmt]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == "benign"
    assert list(body["probabilities"]) == list(CLASS_NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    assert body["model"] == {"name": "tiny-classification", "version": "v1"}
    assert body["image"] == {"format": fmt, "width": 96, "height": 80, "frame": 0, "n_frames": 1}
    assert body["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_classify_accepts_each_format_as_multipart_file(client, fmt):
    files = {"file": (f"scan.{fmt}", FORMAT_BYTES[fmt](), MEDIA_TYPES[fmt])}
    response = client.post("/classify", files=files)
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "benign"
    assert response.json()["image"]["format"] == fmt


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_octet_stream_is_sniffed_from_the_bytes(client, fmt):
    response = client.post(
        "/classify",
        content=FORMAT_BYTES[fmt](),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["image"]["format"] == fmt


def test_multipart_part_typed_octet_stream_is_sniffed(client):
    response = client.post(
        "/classify", files={"file": ("blob", jpeg(), "application/octet-stream")}
    )
    assert response.status_code == 200, response.text
    assert response.json()["image"]["format"] == "jpeg"


@pytest.mark.parametrize(
    ("pixels", "label"),
    [(uniform(10), "normal"), (scan(), "benign"), (uniform(250), "malignant")],
)
def test_classify_label_follows_the_image(client, pixels, label):
    response = client.post("/classify", content=png(pixels), headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    body = response.json()
    assert body["label"] == label
    assert max(body["probabilities"], key=body["probabilities"].get) == label


def test_segment_returns_a_mask_of_the_input_size_around_the_lesion(client):
    response = client.post("/segment", content=png(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    mask = mask_of(body["mask_png"])
    assert mask.shape == (80, 96)
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    x, y, w, h = LESION
    bbox = body["bbox"]
    assert abs(bbox["x"] - x) <= 2 and abs(bbox["y"] - y) <= 2
    assert abs(bbox["width"] - w) <= 3 and abs(bbox["height"] - h) <= 3
    assert body["lesion_area_fraction"] == pytest.approx(w * h / (96 * 80), rel=0.15)
    assert body["lesion_area_fraction"] == pytest.approx((mask > 0).mean())
    assert body["model"] == {"name": "tiny-segmentation", "version": "v1"}
    assert body["image"] == {"format": "png", "width": 96, "height": 80, "frame": 0, "n_frames": 1}


def test_segment_of_an_image_without_lesion_has_no_bbox(client):
    response = client.post(
        "/segment", content=png(uniform(10)), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    assert response.json()["bbox"] is None
    assert response.json()["lesion_area_fraction"] == 0.0


def test_segment_with_accept_png_returns_the_mask_itself(client):
    response = client.post(
        "/segment", content=jpeg(), headers={"Content-Type": "image/jpeg", "Accept": "image/png"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["X-Model-Version"] == "v1"
    mask = Image.open(io.BytesIO(response.content))
    assert mask.mode == "L"
    assert mask.size == (96, 80)
    assert set(np.unique(np.asarray(mask))) == {0, 255}


def test_segment_prefers_json_when_accept_lists_it_first(client):
    response = client.post(
        "/segment",
        content=png(),
        headers={"Content-Type": "image/png", "Accept": "application/json, image/png"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("size", [(8, 8), (640, 480), (300, 900)])
def test_mask_has_the_same_size_as_the_input(client, size):
    width, height = size
    pixels = np.full((height, width), 100, dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 230
    response = client.post("/segment", content=png(pixels), headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    assert mask_of(response.json()["mask_png"]).shape == (height, width)


def test_diagnose_segments_a_lesion(client):
    response = client.post("/diagnose", files={"file": ("scan.png", png(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["classification"]["label"] == "benign"
    assert body["classification"]["model"] == {"name": "tiny-classification", "version": "v1"}
    assert body["segmentation"]["model"] == {"name": "tiny-segmentation", "version": "v1"}
    assert mask_of(body["segmentation"]["mask_png"]).shape == (80, 96)
    assert body["image"] == {"format": "png", "width": 96, "height": 80, "frame": 0, "n_frames": 1}
    assert body["request_id"] == response.headers["X-Request-ID"]


def test_diagnose_of_a_normal_image_has_no_segmentation(client):
    response = client.post(
        "/diagnose", content=png(uniform(10)), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    assert response.json()["classification"]["label"] == "normal"
    assert response.json()["segmentation"] is None


def test_sixteen_bit_png_is_accepted(client):
    pixels = scan().astype(np.uint16) * 257
    response = client.post(
        "/classify", content=png(Image.fromarray(pixels)), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "benign"


def test_cmyk_jpeg_is_accepted(client):
    from service_inputs import encode

    image = Image.fromarray(scan()).convert("CMYK")
    response = client.post(
        "/classify", content=encode(image, "JPEG"), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["image"]["format"] == "jpeg"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_and_palette_pngs_are_accepted(client, mode):
    image = Image.fromarray(scan()).convert(mode)
    response = client.post("/classify", content=png(image), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text


def test_frame_parameter_picks_a_frame_of_a_multiframe_dicom(client):
    data = dicom([uniform(10, 96, 80), scan(), uniform(250, 96, 80)])
    labels = []
    for frame in range(3):
        response = client.post(
            f"/diagnose?frame={frame}", content=data, headers={"Content-Type": "application/dicom"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image"] == {
            "format": "dicom", "width": 96, "height": 80, "frame": frame, "n_frames": 3,
        }  # fmt: skip
        labels.append(body["classification"]["label"])
    assert labels == ["normal", "benign", "malignant"]


def test_frame_defaults_to_the_first(client):
    data = dicom([uniform(250, 96, 80), uniform(10, 96, 80)])
    response = client.post("/classify", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200
    assert response.json()["label"] == "malignant"
    assert response.json()["image"]["frame"] == 0


@pytest.mark.parametrize(
    "name",
    [
        "examples_ybr_color.dcm",
        "examples_rgb_color.dcm",
        "examples_palette.dcm",
        "examples_jpeg2k.dcm",
        "ExplVR_BigEnd.dcm",
    ],
)
def test_diagnose_accepts_pydicom_shipped_files(client, name):
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file(name), "rb").read()
    response = client.post("/diagnose", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["format"] == "dicom"
    assert body["classification"]["label"] in CLASS_NAMES
    if body["segmentation"] is not None:
        mask = mask_of(body["segmentation"]["mask_png"])
        assert mask.shape == (body["image"]["height"], body["image"]["width"])


def test_ybr_cine_frame_count_is_reported(client):
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("examples_ybr_color.dcm"), "rb").read()
    response = client.post(
        "/classify?frame=29", content=data, headers={"Content-Type": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["image"]["frame"] == 29
    assert response.json()["image"]["n_frames"] == 30


def test_diagnose_returns_the_analysed_frame_when_asked(client):
    frames = [uniform(10, 96, 80), scan(), uniform(250, 96, 80)]
    response = client.post(
        "/diagnose?frame=1&include_image=true",
        content=dicom(frames),
        headers={"Content-Type": "application/dicom"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    image = mask_of(body["image_png"])
    assert image.shape == (80, 96)
    assert image.dtype == np.uint8
    # the frame that was analysed, not the first one
    assert image.std() > 0
    assert mask_of(body["segmentation"]["mask_png"]).shape == image.shape


def test_diagnose_leaves_out_the_image_by_default(client):
    response = client.post("/diagnose", content=png(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    assert response.json()["image_png"] is None
