"""PHI canaries in every VR, multi-valued and malformed, through every entry point that reads a
DICOM file: no canary may reach the application log or the audit log.

In-process, with the service's own log handler (service.logs: the JSON formatter, the filter of
foreign records, warnings as records) on the root logger at DEBUG, so that every record any code
writes, pydicom's warnings and tracebacks included, is judged as it would be written. The files
also go through a results builder that fails (a bug, simulated), so that an exception raised with
patient data in reach is logged, and judged, too.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_support import multipart_body, pacs_dicom
from fastapi import FastAPI
from pydicom import dcmread
from pydicom.config import settings as pydicom_settings

from service import logs
from service.dicom.results import DicomResults, get_dicom_results

STUDY_UID = "1.2.826.0.1.3680043.9.7777.31071"
# Every canary value holds "canary" or one of these dates, none of which a test file holds else.
DATES = ("19310717", "19320818", "19330919", "19340101")
CANARY = re.compile("kanarie|" + "|".join(DATES), re.IGNORECASE)

# (keyword, VR, value): multi-valued with a backslash, malformed for its VR, or both. pydicom
# will not hold a number that is no number, so those are placeholders replaced in the bytes.
_BYTE_EDITS = {b"112233445": b"KANARIEDS", b"556677889": b"KANARIEIS", b"765432109": b"7KANARIE7"}
PHI_VALUES = [
    ("PatientName", "PN", "Kanarie^Pn\\Kanarie^Second"),
    ("ReferringPhysicianName", "PN", "Kanarie^Referrer"),
    ("PatientID", "LO", "KANARIELO1\\KANARIELO2"),
    ("OtherPatientIDs", "LO", "KANARIE-OTHER-1\\KANARIE-OTHER-2"),
    ("StudyDescription", "LO", "Kanarie study of the left breast"),
    ("AccessionNumber", "SH", "KANARIESH\\KANARIESH2"),
    ("PatientBirthDate", "DA", "19310717\\19320818"),
    ("StudyDate", "DA", "19330919\\KANARIEDA"),
    ("StudyTime", "TM", "KANARIETM\\1200"),
    ("AcquisitionDateTime", "DT", "KANARIEDT\\19340101"),
    ("PatientAge", "AS", "KANARIEAS\\077Y"),
    ("PatientSex", "CS", "KANARIECS\\F"),
    ("PatientWeight", "DS", "112233445\\77.7"),  # 112233445: KANARIEDS, written as bytes
    ("InstanceNumber", "IS", "556677889\\7"),  # 556677889: KANARIEIS
    ("StationAETitle", "AE", "KANARIEAE"),
    ("PatientComments", "LT", "Kanarie comment\\with a backslash"),
    ("DerivationDescription", "ST", "Kanarie derivation"),
    ("ImageComments", "LT", "Kanarie image comment"),
    ("InstitutionName", "LO", "Kanarie Hospital"),
    ("InstitutionAddress", "ST", "1 Kanarie Road"),
    ("SeriesInstanceUID", "UI", "1.2.KANARIE.3\\1.2.3"),
]


def _write(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue()
    for placeholder, canary in _BYTE_EDITS.items():
        data = data.replace(placeholder, canary)  # same length: the file stays well formed
    return data


def canary_files() -> dict[str, bytes]:
    """{name: DICOM bytes}: a good image whose tags are canaries, and broken variants of it."""
    ds = dcmread(io.BytesIO(pacs_dicom(study_uid=STUDY_UID)))
    saved = pydicom_settings.writing_validation_mode
    pydicom_settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for keyword, vr, value in PHI_VALUES:
                ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, value)
            ds.SpecificCharacterSet = "ISO_IR 100"
            good = _write(ds)
            ds.NumberOfFrames = "765432109"
            frames = _write(ds)
    finally:
        pydicom_settings.writing_validation_mode = saved
    return {
        "canaries": good,
        "charset": good.replace(b"ISO_IR 100", b"KANARIE_CS"),
        "number-of-frames": frames,
        "truncated": good[: len(good) * 2 // 3],
        "header-only": good[:900],
    }


class ExplodingResults(DicomResults):
    """The results builder with a bug that quotes the patient's data in its message."""

    def diagnosis(self, analysis):  # noqa: ANN001, ANN201 (DicomResults's signature)
        ds = analysis.image.dicom
        raise ValueError(f"cannot build for {ds.PatientName!r} born {ds.PatientBirthDate!r}")


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """The service's JSON log handler on the root logger at DEBUG, warnings included."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactForeignValues())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    shown = warnings.showwarning
    warnings.showwarning = logs._show_warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = logs._show_warning
            yield stream
    finally:
        warnings.showwarning = shown
        root.removeHandler(handler)
        root.setLevel(level)


def _exploding(app: FastAPI) -> None:
    app.dependency_overrides[get_dicom_results] = lambda: ExplodingResults("", "test")


@pytest.mark.parametrize("builder", ["real", "exploding"])
def test_no_canary_in_any_vr_reaches_the_log_or_the_audit_log(
    serve, tiny_model_dir: Path, tmp_path: Path, service_log: io.StringIO, builder: str
) -> None:
    audit_path = tmp_path / "audit.log"
    files = canary_files()
    statuses = {}
    hook = _exploding if builder == "exploding" else None
    with serve(tiny_model_dir, app_hook=hook, AUDIT_LOG_FILE=audit_path) as client:
        for name, data in files.items():
            for path, accept in [
                ("/classify", "application/json"),
                ("/diagnose", "application/json"),
                ("/diagnose", "application/dicom"),
                ("/segment", "application/dicom"),
            ]:
                headers = {"Content-Type": "application/dicom", "Accept": accept}
                response = client.post(path, content=data, headers=headers)
                statuses[f"{path} {accept} {name}"] = response.status_code
        body, content_type = multipart_body(list(files.values()))
        response = client.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
        )
        statuses["stow"] = response.status_code
    text = service_log.getvalue()
    audit = audit_path.read_text()
    log_hits = sorted({m.group(0) for m in CANARY.finditer(text)})
    audit_hits = sorted({m.group(0) for m in CANARY.finditer(audit)})
    print(statuses)
    assert log_hits == [], [line for line in text.splitlines() if CANARY.search(line)][:3]
    assert audit_hits == [], [line for line in audit.splitlines() if CANARY.search(line)][:3]
    assert statuses["stow"] in (200, 202, 409)
    assert '"<withheld>' in text or "'<withheld>'" in text  # pydicom did complain, redacted
    assert len(text.splitlines()) > len(statuses)
