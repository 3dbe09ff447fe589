"""The served answers of the shipped default model on a fixed set of inputs, held as recorded.

A refactoring of the inference path (decoding, preprocessing, the forward, the frame map, the
threshold) must not change one byte of what the service answers. This test serves the repo's
`models/` folder (the embedded defaults the README's serve command starts) and posts a fixed set
of inputs (speckle scans of several sizes and frame shapes, a flat scan, a JPEG, a DICOM) to
/classify, /segment and /diagnose. Every JSON answer, less its request id, must equal the
recorded one byte for byte on the machine that recorded it (same CPU flags and ONNX Runtime);
elsewhere a different CPU may round the last float digits differently, so there the labels,
flags, sizes and mask pixels must match exactly and probabilities within 1e-5.

A new promoted model changes the answers on purpose: re-record with
`python tests/service/test_served_answers.py --record` and commit the file with the model.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
RECORD = HERE / "served_answers.json"
ENDPOINTS = ("classify", "segment", "diagnose")


def _inputs() -> dict[str, tuple[str, bytes, str]]:
    for folder in (str(HERE), str(HERE.parent)):  # the test helpers, once
        if folder not in sys.path:
            sys.path.insert(0, folder)
    from service_inputs import dicom, encode, scan
    from synthetic_scans import speckle_scan

    cases: dict[str, tuple[str, bytes, str]] = {}
    for seed, (height, width) in enumerate([(240, 320), (480, 640), (360, 640), (300, 220)]):
        cases[f"speckle-{seed}.png"] = (
            "png",
            encode(speckle_scan(seed, height, width)),
            "image/png",
        )
    cases["speckle-4.jpg"] = ("jpg", encode(speckle_scan(4), "JPEG", quality=90), "image/jpeg")
    cases["flat.png"] = ("png", encode(scan()), "image/png")
    cases["speckle-5.dcm"] = ("dcm", _fixed_uids(dicom(speckle_scan(5))), "application/dicom")
    return cases


def _fixed_uids(data: bytes) -> bytes:
    """The DICOM with fixed UIDs (the answer echoes the source's), so each run posts the same."""
    from pydicom import dcmread
    from pydicom.filewriter import dcmwrite

    ds = dcmread(io.BytesIO(data))
    for n, keyword in enumerate(("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
        if keyword in ds:
            setattr(ds, keyword, f"1.2.826.0.1.3680043.8.498.{n + 1}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _machine() -> str:
    import onnxruntime

    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return f"{platform.machine()} cpu-flags:{digest} onnxruntime:{onnxruntime.__version__}"


def _answers() -> Iterator[tuple[str, dict[str, Any]]]:
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(MODEL_DIR=ROOT / "models", RELOAD_INTERVAL_S=0, TORCH_THREADS=1)
    with TestClient(create_app(settings)) as client:
        for name, (_, body, media_type) in _inputs().items():
            for endpoint in ENDPOINTS:
                response = client.post(
                    f"/{endpoint}",
                    files={"file": (name, body, media_type)},
                    headers={"Accept": "application/json"},
                )
                assert response.status_code == 200, (name, endpoint, response.text)
                answer = response.json()
                answer.pop("request_id", None)
                yield f"{endpoint} {name}", answer


def record() -> None:
    answers = dict(_answers())
    RECORD.write_text(
        json.dumps({"machine": _machine(), "answers": answers}, indent=1, sort_keys=True) + "\n"
    )


def _mask_pixels(answer: Any) -> Iterator[np.ndarray]:
    """Every base64 PNG in an answer, decoded (masks and overlays)."""
    if isinstance(answer, dict):
        for key, value in answer.items():
            if key.endswith("_png") and isinstance(value, str):
                yield np.asarray(Image.open(io.BytesIO(base64.b64decode(value))))
            else:
                yield from _mask_pixels(value)
    elif isinstance(answer, list):
        for value in answer:
            yield from _mask_pixels(value)


def _same_within_rounding(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            if key.endswith("_png") and isinstance(want[key], str):
                continue  # compared as pixels
            _same_within_rounding(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_within_rounding(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, abs=1e-5), where
    else:
        assert got == want, where


def test_served_answers_are_the_recorded_ones() -> None:
    recorded = json.loads(RECORD.read_text())
    answers = dict(_answers())
    assert sorted(answers) == sorted(recorded["answers"])
    served = {a["model"]["version"] for a in answers.values() if "model" in a}
    want_versions = {a["model"]["version"] for a in recorded["answers"].values() if "model" in a}
    assert served == want_versions, (
        f"the served model changed ({want_versions} -> {served}): re-record with "
        "`python tests/service/test_served_answers.py --record`"
    )
    if recorded["machine"] == _machine():
        for key, want in recorded["answers"].items():
            assert json.dumps(answers[key], sort_keys=True) == json.dumps(want, sort_keys=True), key
        return
    for key, want in recorded["answers"].items():
        _same_within_rounding(answers[key], want, key)
        for got_px, want_px in zip(_mask_pixels(answers[key]), _mask_pixels(want), strict=True):
            assert np.array_equal(got_px, want_px), key


def test_the_fixed_inputs_exercise_every_kind_of_answer() -> None:
    """The record is not vacuous: it holds each endpoint, each input kind, a drawn lesion and
    more than one label."""
    recorded = json.loads(RECORD.read_text())["answers"]
    assert {key.split()[0] for key in recorded} == set(ENDPOINTS)
    assert {key.rsplit(".", 1)[1] for key in recorded} == {"png", "jpg", "dcm"}
    assert any(a.get("segmentation") for k, a in recorded.items() if k.startswith("diagnose"))
    assert any(np.any(px) for a in recorded.values() for px in _mask_pixels(a))
    labels = {a["label"] for k, a in recorded.items() if k.startswith("classify")}
    assert len(labels) >= 2, labels


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        sys.path.insert(0, str(ROOT))
        record()
        print(f"recorded {RECORD}")
    else:
        sys.exit("usage: python tests/service/test_served_answers.py --record")
