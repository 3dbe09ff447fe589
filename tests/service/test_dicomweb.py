"""POST /dicomweb/studies: the STOW-RS response, failure reasons, and delivery of the results.

Delivery goes to a real HTTP server on a loopback port, run in a thread by the test, that records
what it was sent and answers as a STOW-RS origin server would (or with errors, to see retries).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dicom_support import (
    COMPREHENSIVE_SR_STORAGE,
    SEG_STORAGE,
    header,
    multipart_body,
    pacs_dicom,
    pydicom_file,
    read_parts,
    seg_mask,
)
from fastapi.testclient import TestClient
from service_inputs import uniform

REFERENCED_SOP = "00081199"
FAILED_SOP = "00081198"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"


def stored_uids(body: dict) -> list[str]:
    return [
        item[SOP_INSTANCE]["Value"][0] for item in body.get(REFERENCED_SOP, {}).get("Value", [])
    ]


def failures(body: dict) -> dict[str, int]:
    return {
        item[SOP_INSTANCE].get("Value", [""])[0]: item[FAILURE_REASON]["Value"][0]
        for item in body.get(FAILED_SOP, {}).get("Value", [])
    }


def stow(client: TestClient, parts: list[bytes], path: str = "/dicomweb/studies"):
    body, content_type = multipart_body(parts)
    return client.post(
        path,
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )


def test_stow_analyses_every_instance_and_answers_dicom_json(client: TestClient) -> None:
    study = "1.2.826.0.1.3680043.10.77.1"
    instances = [pacs_dicom(study_uid=study), pacs_dicom(uniform(10, 96, 80), study_uid=study)]
    response = stow(client, instances)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    assert stored_uids(response.json()) == [header(i).SOPInstanceUID for i in instances]
    assert FAILED_SOP not in response.json()
    assert stow(client, instances, f"/dicomweb/studies/{study}").status_code == 200


def test_stow_lists_each_failed_instance_with_its_reason(client: TestClient) -> None:
    good = pacs_dicom()
    not_ultrasound = pydicom_file("CT_small.dcm")
    no_study = pacs_dicom()
    response = stow(client, [good, not_ultrasound, b"not a dicom file at all"])
    assert response.status_code == 202
    body = response.json()
    assert stored_uids(body) == [header(good).SOPInstanceUID]
    assert failures(body) == {header(not_ultrasound).SOPInstanceUID: 0x0122, "": 0xC000}

    other_study = stow(client, [no_study], "/dicomweb/studies/1.2.3.4")
    assert other_study.status_code == 409
    assert failures(other_study.json()) == {header(no_study).SOPInstanceUID: 0xA900}


@pytest.mark.parametrize(
    ("content_type", "status", "code"),
    [
        ("application/dicom", 415, "unsupported_media_type"),
        (
            'multipart/related; type="application/dicom+json"; boundary=x',
            415,
            "unsupported_media_type",
        ),
        ('multipart/related; type="application/dicom"', 400, "malformed_multipart"),
        (
            'multipart/related; type="application/dicom"; boundary=absent',
            400,
            "malformed_multipart",
        ),
    ],
)
def test_stow_refuses_bodies_that_are_not_dicom_multipart(
    client: TestClient, content_type: str, status: int, code: str
) -> None:
    response = client.post(
        "/dicomweb/studies", content=pacs_dicom(), headers={"Content-Type": content_type}
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


class _Recorder(BaseHTTPRequestHandler):
    """A STOW-RS origin server that keeps what it gets and answers with the server's `status`."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers["Content-Length"])
        server = self.server
        server.requests.append((dict(self.headers), self.rfile.read(length)))  # type: ignore[attr-defined]
        status = server.status  # type: ignore[attr-defined]
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def stow_target(status: int) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests = []  # type: ignore[attr-defined]
    server.status = status  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/dicom-web/studies"


def _metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def test_results_are_sent_to_the_stow_target_with_basic_auth(serve, tiny_model_dir: Path) -> None:
    source_data = pacs_dicom()
    source = header(source_data)
    with stow_target(200) as target:
        with serve(
            tiny_model_dir,
            RESULTS_STOW_URL=_url(target),
            RESULTS_STOW_USERNAME="router",
            RESULTS_STOW_PASSWORD="s3cret",
        ) as client:
            response = stow(client, [source_data])
            delivered = _metric(client, 'busi_results_deliveries_total{outcome="delivered"}')
        (request_headers, body) = target.requests[0]
    assert response.status_code == 200
    assert len(target.requests) == 1
    assert delivered == 1
    expected = "Basic " + base64.b64encode(b"router:s3cret").decode()
    assert request_headers["Authorization"] == expected
    seg, sr, presentation_state = read_parts(request_headers["Content-Type"], body)
    assert (seg.SOPClassUID, sr.SOPClassUID) == (SEG_STORAGE, COMPREHENSIVE_SR_STORAGE)
    assert presentation_state.Modality == "PR"  # the overlay is delivered with them
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID


def test_a_failed_delivery_is_retried_then_reported_and_counted(
    serve, tiny_model_dir: Path
) -> None:
    source_data = pacs_dicom()
    with stow_target(503) as target:
        with serve(
            tiny_model_dir,
            RESULTS_STOW_URL=_url(target),
            RESULTS_STOW_TOKEN="tok-123",
            RESULTS_STOW_ATTEMPTS=2,
        ) as client:
            response = stow(client, [source_data])
            failed = _metric(client, 'busi_results_deliveries_total{outcome="failed"}')
            instances = _metric(client, 'busi_dicomweb_instances_total{outcome="failed"}')
    assert response.status_code == 409
    assert failures(response.json()) == {header(source_data).SOPInstanceUID: 0x0110}
    assert len(target.requests) == 2  # RESULTS_STOW_ATTEMPTS
    assert all(h["Authorization"] == "Bearer tok-123" for h, _ in target.requests)
    assert failed == 1 and instances == 1


def test_a_refused_delivery_is_not_retried(serve, tiny_model_dir: Path) -> None:
    with stow_target(400) as target:
        with serve(tiny_model_dir, RESULTS_STOW_URL=_url(target)) as client:
            response = stow(client, [pacs_dicom()])
    assert response.status_code == 409
    assert len(target.requests) == 1


def test_stow_analyses_a_whole_cine_loop_and_sends_the_key_frames_results(
    serve, tiny_model_dir: Path
) -> None:
    lesion = uniform(110, 96, 80)
    lesion[20:60, 20:70] = 230  # the rigged segmenter outlines the bright rectangle
    frames = [uniform(10, 96, 80), uniform(10, 96, 80), lesion]  # the lesion only in frame 3
    source_data = pacs_dicom(frames)
    with stow_target(200) as target, serve(tiny_model_dir, RESULTS_STOW_URL=_url(target)) as client:
        response = stow(client, [source_data])
        (request_headers, body) = target.requests[0]
    assert response.status_code == 200
    seg, _, _ = read_parts(request_headers["Content-Type"], body)
    item = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert item.SourceImageSequence[0].ReferencedFrameNumber == 3  # not the first frame
    assert seg_mask(seg, header(source_data), 2).any()


def test_stow_refuses_a_loop_longer_than_the_cine_cap_as_out_of_resources(
    serve, tiny_model_dir: Path
) -> None:
    source_data = pacs_dicom([uniform(110, 96, 80)] * 3)
    with serve(tiny_model_dir, MAX_CINE_FRAMES=2) as client:
        response = stow(client, [source_data])
    assert response.status_code == 409
    assert failures(response.json()) == {header(source_data).SOPInstanceUID: 0xA700}
