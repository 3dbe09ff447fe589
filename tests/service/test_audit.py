"""The audit log: its own file, 0600, one JSON line per inference request with the key id, the
request id, the source UIDs of a DICOM input, the model versions, the result and the input's
hash; the UIDs reach the audit log only, never the application log."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from pathlib import Path

import pytest
from dicom_support import header, pacs_dicom
from service_inputs import png

from service.auth import keys_file_line
from service.keys import new_key
from service.logs import JsonFormatter

REQUEST_ID = "7c1e4d2a-9b3f-4e8a-a1d6-0f2b3c4d5e6f"


@pytest.fixture
def audited(serve, tiny_model_dir, tmp_path):
    """(client, audit file, key) of an app with one `infer` key and an audit log."""
    key = new_key()
    keys = tmp_path / "api_keys"
    keys.write_text(keys_file_line("reader-1", ["infer"], key) + "\n")
    audit = tmp_path / "audit" / "audit.jsonl"
    audit.parent.mkdir()

    def start():
        return serve(tiny_model_dir, API_KEYS_FILE=keys, AUDIT_LOG_FILE=audit)

    return start, audit, key


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_inference_is_one_audit_record_in_a_private_file(audited):
    start, audit, key = audited
    data = png()
    with start() as client:
        response = client.post(
            "/classify",
            content=data,
            headers={
                "Content-Type": "image/png",
                "Authorization": f"Bearer {key}",
                "X-Request-ID": REQUEST_ID,
            },
        )
        assert response.status_code == 200
        client.get("/healthz")  # not an audited endpoint
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    (record,) = records(audit)
    assert record["request_id"] == REQUEST_ID
    assert record["key_id"] == "reader-1"
    assert record["endpoint"] == "/classify" and record["status"] == 200
    (entry,) = record["inputs"]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["format"] == "png" and entry["source"] is None
    assert entry["models"] == {"classification": "v1"}
    assert entry["result"]["label"] == response.json()["label"]
    assert entry["result"]["probability"] == pytest.approx(
        response.json()["probabilities"][response.json()["label"]], abs=1e-4
    )
    assert key not in audit.read_text()


def test_dicom_source_uids_reach_the_audit_log_and_not_the_application_log(audited, caplog):
    start, audit, key = audited
    data = pacs_dicom()
    ds = header(data)
    uids = {tag: str(ds[tag].value) for tag in ("StudyInstanceUID", "SeriesInstanceUID")}
    uids["SOPInstanceUID"] = str(ds.SOPInstanceUID)
    with start() as client, caplog.at_level(logging.DEBUG):
        response = client.post(
            "/diagnose",
            content=data,
            headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200
    (record,) = records(audit)
    (entry,) = record["inputs"]
    assert entry["source"] == uids
    assert set(entry["models"]) == {"classification", "segmentation"}
    assert entry["result"]["label"] == response.json()["classification"]["label"]
    app_log = caplog.text + "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert not [uid for uid in uids.values() if uid in app_log]


def test_refused_keys_and_refused_inputs_are_audited(audited):
    start, audit, key = audited
    with start() as client:
        assert client.post("/classify", content=png()).status_code == 401
        response = client.post(
            "/classify",
            content=b"not an image",
            headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 415
    refused, failed = records(audit)
    assert (refused["status"], refused["key_id"], refused["error_code"]) == (
        401,
        None,
        "unauthorized",
    )
    assert (failed["status"], failed["key_id"]) == (415, "reader-1")
    assert failed["inputs"][0]["result"] == {"error": "unsupported_format"}
    assert failed["inputs"][0]["sha256"] == hashlib.sha256(b"not an image").hexdigest()


def test_served_labels_and_top_probabilities_are_counted_per_model_version(client):
    response = client.post("/classify", content=png(), headers={"Content-Type": "image/png"})
    label = response.json()["label"]
    text = client.get("/metrics").text
    assert f'busi_served_labels_total{{label="{label}",task="classification",version="v1"}}' in text
    assert 'busi_top_probability_count{task="classification",version="v1"}' in text


def test_a_renamed_or_removed_audit_log_is_reopened_for_the_next_record(tmp_path):
    from service.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.write({"n": 1})
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's default: rename, then the writer reopens
    audit.write({"n": 2})
    audit.write({"n": 3})
    assert records(tmp_path / "audit.jsonl.1") == [{"n": 1}]  # nothing after the rename
    assert records(path) == [{"n": 2}, {"n": 3}]
    path.unlink()  # removed outright
    audit.write({"n": 4})
    audit.close()
    assert records(path) == [{"n": 4}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
