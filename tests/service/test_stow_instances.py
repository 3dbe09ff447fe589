"""STOW-RS per instance and bounded: each instance succeeds or fails on its own, results go out
only for those that succeed, the answer is 200 / 202 / 409 (never 500), and a request too large
is refused (413) before any instance is analysed, with one log line and an audit record."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from dicom_support import header, pacs_dicom
from fake_pacs import FakePacs, wait_until
from fastapi import FastAPI
from test_dicomweb import failures, stored_uids, stow

from service.dicom.results import DicomResults, get_dicom_results


class ResultsWithABug(DicomResults):
    """The real builder, except for one instance, where it fails as a bug would."""

    broken: str = ""

    def diagnosis(self, analysis):  # noqa: ANN001, ANN201 (DicomResults's signature)
        if analysis.image.dicom.SOPInstanceUID == self.broken:
            raise RuntimeError("a bug in making the results")
        return super().diagnosis(analysis)


def _with_a_bug_for(uid: str):  # noqa: ANN202
    def hook(app: FastAPI) -> None:
        results = ResultsWithABug("", "test")
        object.__setattr__(results, "broken", uid)
        app.dependency_overrides[get_dicom_results] = lambda: results

    return hook


def test_a_bug_in_one_instances_results_fails_only_it_and_only_the_others_are_delivered(
    serve, tiny_model_dir: Path, caplog
) -> None:
    first, broken, last = pacs_dicom(), pacs_dicom(), pacs_dicom()
    broken_uid = header(broken).SOPInstanceUID
    with FakePacs("ok") as pacs:
        with (
            caplog.at_level(logging.INFO),
            serve(
                tiny_model_dir, app_hook=_with_a_bug_for(broken_uid), RESULTS_STOW_URL=pacs.url
            ) as client,
        ):
            response = stow(client, [first, broken, last])
        assert pacs.requests == 2  # the results of the two good ones, nothing for the broken one
    assert response.status_code == 202
    assert stored_uids(response.json()) == [
        header(first).SOPInstanceUID,
        header(last).SOPInstanceUID,
    ]
    assert failures(response.json()) == {broken_uid: 0x0110}
    (access,) = [r for r in caplog.records if r.name == "service.access"]
    assert (access.instances, access.stored, access.failed) == (3, 2, 1)  # type: ignore[attr-defined]
    assert access.failure_reasons == {"0x0110": 1}  # type: ignore[attr-defined]


def test_stow_logs_one_line_per_request_however_many_parts_fail(client, caplog) -> None:
    parts = [b"not a dicom file"] * 40 + [pacs_dicom()]
    with caplog.at_level(logging.DEBUG):
        response = stow(client, parts)
    assert response.status_code == 202
    assert failures(response.json()) == {"": 0xC000}  # 40 of them, one key
    assert len(response.json()["00081198"]["Value"]) == 40
    request_lines = [r for r in caplog.records if r.name.startswith("service.")]
    assert len(request_lines) <= 3, [r.getMessage() for r in request_lines]
    (access,) = [r for r in caplog.records if r.name == "service.access"]
    assert access.failure_reasons == {"0xC000": 40}  # type: ignore[attr-defined]


def test_more_parts_than_the_cap_is_413_before_anything_is_analysed(
    serve, tiny_model_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    with serve(tiny_model_dir, MAX_STOW_INSTANCES=3, AUDIT_LOG_FILE=audit) as client:
        response = stow(client, [pacs_dicom()] * 4)
        metrics = client.get("/metrics").text
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "stow_too_large"
    assert "MAX_STOW_INSTANCES" in response.json()["error"]["message"]
    assert 'busi_dicomweb_instances_total{outcome="analysed"} 0.0' in metrics  # none analysed
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert record["status"] == 413
    assert record["stow"]["parts_at_least"] == 4
    assert record["stow"]["refused_by"] == "MAX_STOW_INSTANCES"
    assert record["stow"]["bytes"] > 0


def test_a_million_empty_parts_are_refused_in_moments(client) -> None:
    boundary = "b"
    body = f"--{boundary}\r\n\r\n\r\n".encode() * 1_000_000 + f"--{boundary}--\r\n".encode()
    started = time.perf_counter()
    response = client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    took = time.perf_counter() - started
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "stow_too_large"
    assert took < 5.0, took  # uncapped, every part was analysed: 104 s in the report that asked


def test_more_decoded_pixels_than_the_cap_is_413(serve, tiny_model_dir: Path) -> None:
    one = pacs_dicom()  # 96 x 80 frames
    rows, columns = header(one).Rows, header(one).Columns
    with serve(tiny_model_dir, MAX_STOW_PIXELS=rows * columns * 2) as client:
        assert stow(client, [one, one]).status_code == 200
        response = stow(client, [one, one, one])
    assert response.status_code == 413
    assert "MAX_STOW_PIXELS" in response.json()["error"]["message"]


def test_every_received_part_is_in_the_audit_record(serve, tiny_model_dir: Path, tmp_path) -> None:
    audit = tmp_path / "audit.log"
    good = pacs_dicom()
    with serve(tiny_model_dir, AUDIT_LOG_FILE=audit) as client:
        response = stow(client, [good, b"not a dicom file"])
    assert response.status_code == 202
    (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
    received = record["stow"]["received"]
    assert [r["outcome"] for r in received] == ["stored", "failed"]
    assert received[0]["sop_instance_uid"] == header(good).SOPInstanceUID
    assert received[1]["failure_reason"] == 0xC000 and received[1]["bytes"] == 16
    assert len(record["inputs"]) == 1  # the analysed one, with its result


def test_no_model_before_any_instance_is_503_for_the_whole_request(serve, tmp_path: Path) -> None:
    with serve(tmp_path) as client:  # an empty registry: nothing loads
        response = stow(client, [pacs_dicom(), pacs_dicom()])
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert response.headers["Retry-After"]


def test_a_full_delivery_backlog_is_503_with_retry_after(serve, tiny_model_dir: Path) -> None:
    first: dict = {}
    with FakePacs("hang") as pacs:
        with serve(
            tiny_model_dir,
            RESULTS_STOW_URL=pacs.url,
            RESULTS_STOW_BACKLOG=1,
            RESULTS_STOW_DEADLINE_S=3,
        ) as client:
            waiting = threading.Thread(
                target=lambda: first.update(response=stow(client, [pacs_dicom()]))
            )
            waiting.start()  # its delivery hangs on the target, holding the one backlog place
            assert wait_until(lambda: pacs.requests == 1, 10)
            response = stow(client, [pacs_dicom()])
            waiting.join(10)
        assert pacs.requests == 1  # the second request's instance was not even analysed
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    assert response.headers["Retry-After"]
    assert first["response"].status_code == 409  # its delivery ran out of time: 0x0110
    assert set(failures(first["response"].json()).values()) == {0x0110}
