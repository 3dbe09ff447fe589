"""Request logs: structured, and without image bytes, file names or DICOM tag values."""

from __future__ import annotations

import json
import logging

from service_inputs import dicom, png

from service.logs import JsonFormatter, RedactForeignValues, _show_warning, redact

RID = "0b7e6c1a-58d4-4f0e-9a3c-2d1b0e9f8a7c"
SECRET_NAME = "Doe_Jane_1962-03-04_left_breast.png"


def test_request_log_has_the_safe_fields(client, caplog):
    data = png()
    with caplog.at_level(logging.INFO, logger="service.access"):
        response = client.post(
            "/classify", content=data, headers={"Content-Type": "image/png", "X-Request-ID": RID}
        )
    assert response.status_code == 200
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == RID]
    import hashlib

    assert record.endpoint == "/classify"
    assert record.status == 200
    assert record.bytes == len(data)
    assert record.sha256 == hashlib.sha256(data).hexdigest()[:12]
    assert record.format == "png"
    assert record.models == {"classification": "v1"}
    assert record.latency_ms > 0


def test_logs_hold_no_file_name_nor_dicom_tag_values(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post("/diagnose", files={"file": (SECRET_NAME, png(), "image/png")})
        client.post("/diagnose", files={"file": (SECRET_NAME, b"not an image", "image/png")})
        client.post("/diagnose", files={"file": (SECRET_NAME, dicom(), "application/dicom")})
    formatter = JsonFormatter()
    text = caplog.text + "\n".join(formatter.format(r) for r in caplog.records)
    assert caplog.records
    assert SECRET_NAME not in text and "Doe_Jane" not in text
    assert "Doe^Jane" not in text and "PID-TAG-VALUE-42" not in text


def test_json_formatter_writes_one_object_with_the_extra_fields():
    record = logging.LogRecord("service.access", logging.INFO, "", 0, "POST %s", ("/x",), None)
    record.request_id = "abc"
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["message"] == "POST /x"
    assert entry["level"] == "info"
    assert entry["request_id"] == "abc"
    assert "\n" not in line


def test_redact_withholds_quoted_values_and_keeps_vr_names():
    assert redact("Invalid value for VR IS: '1CANARY'. Please see <https://x>") == (
        "Invalid value for VR IS: '<withheld>'. Please see <https://x>"
    )
    assert redact("Unknown encoding 'ISO_IR CANARY' - using default encoding instead") == (
        "Unknown encoding '<withheld>' - using default encoding instead"
    )
    assert redact("unknown tag - setting VR to 'UN'") == "unknown tag - setting VR to 'UN'"
    assert redact('value b"Doe^Jane" and "Doe^John"') == "value b'<withheld>' and '<withheld>'"


def test_records_of_other_libraries_are_redacted_ours_are_not():
    foreign = logging.LogRecord("pydicom", logging.WARNING, "", 0, "bad value %r", ("Doe",), None)
    ours = logging.LogRecord("service.access", logging.INFO, "", 0, "kept '%s'", ("v1",), None)
    for record in (foreign, ours):
        RedactForeignValues().filter(record)
    assert foreign.getMessage() == "bad value '<withheld>'"
    assert ours.getMessage() == "kept 'v1'"


def test_a_warning_becomes_a_log_record(caplog):
    with caplog.at_level(logging.WARNING, logger="py.warnings"):
        _show_warning(UserWarning("Invalid value for VR IS: 'X'"), UserWarning, "/m.py", 3)
    (record,) = caplog.records
    assert record.name == "py.warnings" and record.category == "UserWarning"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["origin"] == "/m.py:3"
