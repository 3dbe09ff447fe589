"""A round trip through a real PACS: Orthanc sends studies to our STOW-RS entry point, we send the
SEG, SR and presentation state back to Orthanc by STOW-RS, and Orthanc holds them beside the
source images: a synthetic scan, pydicom's ultrasound files and every ultrasound file of
pydicom-data (the retired Ultrasound Image Storage class of color-px.dcm among them).

Needs Debian's `orthanc` and `orthanc-dicomweb` (.ci/install-orthanc.sh, run by scripts/test.sh as
root); skips with the reason without them. Orthanc and the service run as real processes on
loopback ports, Orthanc with HTTP basic auth that the service uses for its deliveries.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicom_support import PYDICOM_US_FILES, header, pacs_dicom, pydicom_file, seg_mask
from PIL import Image
from pydicom import Dataset, dcmread
from service_process import QUIET_ENV, free_port, running_service

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AUTH = ("busi-test", "orthanc-test-password")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()),
        reason="needs Debian's orthanc and orthanc-dicomweb (bash .ci/install-orthanc.sh as root)",
    ),
]


def _orthanc_config(folder: Path, http_port: int, service_url: str) -> Path:
    config = {
        "Name": "busi-roundtrip",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {AUTH[0]: AUTH[1]},
        "HttpTimeout": 120,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"busi": {"Url": f"{service_url}/dicomweb/", "HasDelete": False}},
        },
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    return path


def _start_orthanc(folder: Path, port: int, service_url: str) -> subprocess.Popen:
    config = _orthanc_config(folder, port, service_url)
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("Orthanc exited:\n" + (folder / "orthanc.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/system", auth=AUTH, timeout=2).is_success:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    pytest.fail("Orthanc did not answer within 60 s")


def _json_mask(service_url: str, data: bytes) -> np.ndarray | None:
    response = httpx.post(
        f"{service_url}/diagnose", content=data, headers={"Content-Type": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    if response.json()["segmentation"] is None:
        return None
    png = base64.b64decode(response.json()["segmentation"]["mask_png"])
    return np.asarray(Image.open(io.BytesIO(png))) > 0


def _instances_of_study(rest: httpx.Client, study_uid: str) -> list[Dataset]:
    found = rest.post(
        "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    ).json()
    assert len(found) == 1, study_uid
    instances = rest.get(f"/studies/{found[0]}/instances").json()
    return [dcmread(io.BytesIO(rest.get(f"/instances/{i['ID']}/file").content)) for i in instances]


def _cites(result: Dataset, sop_instance_uid: str) -> bool:
    """Whether the SEG or SR references the instance anywhere in its references."""
    found = []

    def walk(ds: Dataset) -> None:
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.keyword == "ReferencedSOPInstanceUID":
                found.append(element.value)

    walk(result)
    return sop_instance_uid in found


def pydicom_data_ultrasound() -> dict[str, bytes]:
    """Every ultrasound file of pydicom-data (Modality US), the retired SOP classes included."""
    try:
        import data_store
    except ImportError:  # the dev extra installs it
        return {}
    found = {}
    for path in sorted((Path(data_store.__file__).parent / "data").glob("*.dcm")):
        data = path.read_bytes()
        try:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:
            continue
        if ds.get("Modality") == "US":
            found[path.name] = data
    return found


RESULT_MODALITIES = ("SEG", "SR", "PR")


def test_orthanc_sends_a_study_and_stores_our_seg_sr_and_presentation_state(
    tmp_path: Path, tiny_model_dir
) -> None:
    orthanc_port = free_port()
    originals = {
        "synthetic-monochrome": pacs_dicom(pixel_spacing=(0.1, 0.1)),
        **{name: pydicom_file(name) for name in PYDICOM_US_FILES},
        **pydicom_data_ultrasound(),
    }
    assert "color-px.dcm" in originals  # the retired Ultrasound Image Storage class (and
    # color-pl.dcm, the same instance stored planar: Orthanc keeps one of the two)
    env = {
        **QUIET_ENV,
        "MODEL_DIR": str(tiny_model_dir),
        "RESULTS_STOW_URL": f"http://127.0.0.1:{orthanc_port}/dicom-web/studies",
        "RESULTS_STOW_USERNAME": AUTH[0],
        "RESULTS_STOW_PASSWORD": AUTH[1],
        "DICOM_UID_ROOT": "1.2.826.0.1.3680043.10.543",
    }
    with running_service(env, tmp_path / "service.log") as service:
        process = _start_orthanc(tmp_path, orthanc_port, service.url)
        try:
            rest = httpx.Client(base_url=f"http://127.0.0.1:{orthanc_port}", auth=AUTH, timeout=300)
            studies = set()
            stored = {}  # files of pydicom-data share instance UIDs: Orthanc keeps the first
            for name, data in originals.items():
                answer = rest.post("/instances", content=data)
                assert answer.status_code == 200, answer.text
                studies.add(answer.json()["ParentStudy"])
                if answer.json()["Status"] == "Success":
                    stored[name] = data
            # Orthanc, as a PACS would, sends the studies to our STOW-RS entry point
            sent = rest.post("/dicom-web/servers/busi/stow", json={"Resources": sorted(studies)})
            assert sent.status_code == 200, sent.text + service.log_tail()

            compared = []
            for name, data in stored.items():
                source = header(data)
                # several files share a study: each result is matched by what it cites
                results = [
                    ds
                    for ds in _instances_of_study(rest, source.StudyInstanceUID)
                    if ds.Modality in RESULT_MODALITIES and _cites(ds, source.SOPInstanceUID)
                ]
                found = {m: [ds for ds in results if ds.Modality == m] for m in RESULT_MODALITIES}
                assert len(found["SR"]) == 1, name
                assert len(found["PR"]) == 1, name  # the overlay any viewer shows
                (report,) = found["SR"]
                assert report.SOPInstanceUID.startswith("1.2.826.0.1.3680043.10.543.")
                if not found["SEG"]:  # a normal finding: no outline, as in the JSON
                    continue
                assert len(found["SEG"]) == 1, name
                (seg,) = found["SEG"]
                assert _cites(report, seg.SOPInstanceUID), name
                if int(source.get("NumberOfFrames") or 1) == 1:  # the key frame is frame 0
                    expected_mask = _json_mask(service.url, data)
                    np.testing.assert_array_equal(seg_mask(seg, source, 0), expected_mask)
                    compared.append(name)
            assert "synthetic-monochrome" in compared  # the tiny models outline its lesion
            retired = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (retired)
            assert retired in {header(data).SOPClassUID for data in stored.values()}
            statistics = rest.get("/statistics").json()
            assert statistics["CountStudies"] == len(studies)
        finally:
            process.terminate()
            process.wait(timeout=30)
