"""DICOM results of /segment and /diagnose: SEG and SR content, references, UIDs, 406, dciodvfy.

The tiny rigged models of tests/conftest.py call service_inputs.scan() benign and outline its bright
rectangle; a uniform dark image is normal.
"""

from __future__ import annotations

import base64
import io
import logging
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from dicom_support import (
    COMPREHENSIVE_SR_STORAGE,
    GSPS_STORAGE,
    IOD_OF_CLASS,
    PYDICOM_US_FILES,
    SEG_STORAGE,
    dciodvfy_errors,
    header,
    pacs_dicom,
    pydicom_file,
    read_parts,
    seg_mask,
)
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from PIL import Image
from pydicom import Dataset, dcmread
from service_inputs import LESION, jpeg, png, scan, uniform

from service.dicom.builders import (
    PRIVATE_SCHEME,
    RESEARCH_STATEMENT,
    silence_highdicom_warnings,
)

DICOM = {"Content-Type": "application/dicom"}
WANT_DICOM = {**DICOM, "Accept": "application/dicom"}


def json_mask(client: TestClient, data: bytes, frame: int = 0) -> np.ndarray:
    response = client.post(f"/segment?frame={frame}", content=data, headers=DICOM)
    assert response.status_code == 200
    png_bytes = base64.b64decode(response.json()["mask_png"])
    return np.asarray(Image.open(io.BytesIO(png_bytes))) > 0


def seg_of(client: TestClient, data: bytes, frame: int = 0) -> Dataset:
    response = client.post(f"/segment?frame={frame}", content=data, headers=WANT_DICOM)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    return dcmread(io.BytesIO(response.content))


def diagnose_objects(client: TestClient, data: bytes, accept: str) -> list[Dataset]:
    response = client.post("/diagnose", content=data, headers={**DICOM, "Accept": accept})
    assert response.status_code == 200, response.text
    return read_parts(response.headers["content-type"], response.content)


def test_segment_returns_a_seg_that_references_the_source_and_equals_the_json_mask(
    client: TestClient,
) -> None:
    data = pacs_dicom(pixel_spacing=(0.2, 0.25))
    source = header(data)
    seg = seg_of(client, data)
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Lesion"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny-segmentation", "v1")
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.2, 0.25]
    mask = seg_mask(seg, source, 0)
    x, y, w, h = LESION
    assert mask[y : y + h, x : x + w].all() and mask.sum() < 2 * w * h
    np.testing.assert_array_equal(mask, json_mask(client, data))


def test_segment_of_a_cine_frame_references_that_frame(client: TestClient) -> None:
    frames = [uniform(100, 96, 80), scan(), uniform(100, 96, 80)]
    data = pacs_dicom(frames)
    source = header(data)
    seg = seg_of(client, data, frame=1)
    (frame_group,) = seg.PerFrameFunctionalGroupsSequence
    item = frame_group.DerivationImageSequence[0].SourceImageSequence[0]
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert item.ReferencedSOPClassUID == source.SOPClassUID
    assert item.ReferencedFrameNumber == 2  # 1-based
    # the instance list (PS3.3 10.8) names the instance only, with its own class
    (instance,) = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert instance.ReferencedSOPClassUID == source.SOPClassUID
    assert "ReferencedFrameNumber" not in instance
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]  # none to keep
    np.testing.assert_array_equal(seg_mask(seg, source, 1), json_mask(client, data, frame=1))


def _content(item: Dataset) -> list[Dataset]:
    """Every content item below `item`, depth first."""
    found = []
    for child in item.get("ContentSequence", []):
        found.append(child)
        found.extend(_content(child))
    return found


def _named(items: list[Dataset], meaning: str) -> list[Dataset]:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


@pytest.mark.parametrize(
    "accept", ["application/dicom", 'multipart/related; type="application/dicom"']
)
def test_diagnose_returns_seg_and_tid1500_report_for_a_lesion(
    client: TestClient, accept: str
) -> None:
    data = pacs_dicom(pixel_spacing=(0.5, 0.5))
    source = header(data)
    expected = client.post("/diagnose", content=data, headers=DICOM).json()
    assert expected["classification"]["label"] == "benign"

    seg, sr, pr = diagnose_objects(client, data, accept)
    assert seg.SOPClassUID == SEG_STORAGE
    assert pr.SOPClassUID == GSPS_STORAGE
    assert sr.SOPClassUID == COMPREHENSIVE_SR_STORAGE
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "research use" in sr.SeriesDescription.lower()
    items = _content(sr)

    findings = {i.ConceptCodeSequence[0].CodeMeaning for i in _named(items, "Finding")}
    assert findings == {"Benign", "Lesion"}  # the image's finding; the outlined lesion
    classes = {
        i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.ConceptNameCodeSequence[0].CodeValue == "278201002"  # SCT Classification
    }
    assert classes == {"Benign"}
    probabilities = {
        i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
        for i in items
        if i.ValueType == "NUM"
        and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    }
    for name, p in expected["classification"]["probabilities"].items():
        assert probabilities[f"Probability of {name}"] == pytest.approx(p, abs=1e-6)

    mask = json_mask(client, data)
    areas = _named(items, "Area")  # the SEG's segment, then the one region of the mask
    assert len(areas) == 2
    for area in areas:
        assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(mask.sum() * 0.25)
        assert area.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"
    bbox = expected["segmentation"]["bbox"]
    x, y, w = bbox["x"], bbox["y"], bbox["width"]
    (width,) = _named(items, "Width")
    assert float(width.MeasuredValueSequence[0].NumericValue) == pytest.approx(w * 0.5)
    (outline,) = [i for i in items if i.ValueType == "SCOORD"]
    assert outline.GraphicType == "POLYLINE"
    points = np.array(outline.GraphicData, dtype=float).reshape(-1, 2)
    assert (points[0] == points[-1]).all()  # closed
    assert points[:, 0].min() == x and points[:, 0].max() == x + w  # the mask's extent
    assert points[:, 1].min() == y
    (image_ref,) = outline.ContentSequence
    assert image_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    trackers = {i.TextValue for i in _named(items, "Tracking Identifier")}
    assert trackers == {"Image classification", "Lesion", "Lesion 1"}

    versions = {
        (i.TextValue if "TextValue" in i else None) for i in _named(items, "Algorithm Version")
    }
    assert versions == {"v1"}
    names = {i.TextValue for i in _named(items, "Algorithm Name")}
    assert names == {"tiny-classification", "tiny-segmentation"}
    (comment,) = _named(items, "Comment")
    assert comment.TextValue == RESEARCH_STATEMENT

    cited = {
        ref.ReferencedSOPInstanceUID
        for i in items
        if i.ValueType == "IMAGE"
        for ref in i.ReferencedSOPSequence
    }
    assert cited == {source.SOPInstanceUID, seg.SOPInstanceUID}

    # highdicom reads it back as a TID 1500 report with the lesion's segment
    report = hd.sr.srread(io.BytesIO(_bytes(sr)))
    groups = report.content.get_planar_roi_measurement_groups()
    assert any(g.reference_type.meaning == "Referenced Segmentation Frame" for g in groups)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_diagnose_of_a_normal_scan_gives_the_report_without_a_seg(client: TestClient) -> None:
    sr, pr = diagnose_objects(client, pacs_dicom(uniform(10, 96, 80)), "application/dicom")
    assert pr.SOPClassUID == GSPS_STORAGE
    (layer,) = pr.GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in layer  # no outline, only the label
    assert layer.TextObjectSequence[0].UnformattedTextValue.startswith("Normal")
    assert sr.SOPClassUID == COMPREHENSIVE_SR_STORAGE
    items = _content(sr)
    assert {i.ConceptCodeSequence[0].CodeMeaning for i in _named(items, "Finding")} == {"Normal"}
    assert not _named(items, "Area")
    assert not [i for i in items if i.ValueType == "SCOORD"]


@pytest.mark.parametrize("endpoint", ["/segment", "/diagnose"])
@pytest.mark.parametrize("make", [png, jpeg], ids=["png", "jpeg"])
def test_a_png_or_jpeg_asking_for_dicom_gets_406(client: TestClient, endpoint: str, make) -> None:
    response = client.post(endpoint, content=make(), headers={"Accept": "application/dicom"})
    assert response.status_code == 406
    error = response.json()["error"]
    assert error["code"] == "dicom_output_needs_dicom_input"
    assert "DICOM" in error["message"]


def test_json_stays_the_default_for_dicom_input(client: TestClient) -> None:
    response = client.post(
        "/segment", content=pacs_dicom(), headers={**DICOM, "Accept": "application/json, */*"}
    )
    assert response.status_code == 200
    assert response.json()["model"]["name"] == "tiny-segmentation"


def test_a_dicom_without_study_uid_asking_for_dicom_gets_422(client: TestClient) -> None:
    from service_inputs import dicom

    response = client.post("/segment", content=dicom(), headers=WANT_DICOM)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "dicom_not_referenceable"
    assert "StudyInstanceUID" in response.json()["error"]["message"]


def test_uids_are_new_on_every_call_and_under_the_configured_root(
    serve, tiny_model_dir: Path
) -> None:
    data = pacs_dicom()
    root = "1.2.826.0.1.3680043.10.1234"
    with serve(tiny_model_dir, DICOM_UID_ROOT=root) as client:
        first, second = seg_of(client, data), seg_of(client, data)
        sr = diagnose_objects(client, data, "application/dicom")[1]
        assert sr.SOPClassUID == COMPREHENSIVE_SR_STORAGE
    uids = [
        ds.get(name)
        for ds in (first, second, sr)
        for name in ("SOPInstanceUID", "SeriesInstanceUID")
    ]
    assert len(set(uids)) == len(uids)
    assert all(uid.startswith(root + ".") and len(uid) <= 64 for uid in uids)


def test_without_a_root_uids_are_uuid_derived(client: TestClient) -> None:
    seg = seg_of(client, pacs_dicom())
    assert seg.SOPInstanceUID.startswith("2.25.")


def test_every_seg_and_sr_passes_dciodvfy(client: TestClient, tmp_path: Path) -> None:
    inputs = {
        "synthetic-spacing": (pacs_dicom(pixel_spacing=(0.2, 0.2)), 0),
        "synthetic-cine": (pacs_dicom([uniform(100, 96, 80), scan()]), 1),
        "synthetic-normal": (pacs_dicom(uniform(10, 96, 80)), 0),
        **{name: (pydicom_file(name), 2 if "ybr" in name else 0) for name in PYDICOM_US_FILES},
    }
    failures = {}
    for name, (data, frame) in inputs.items():
        seg = client.post(f"/segment?frame={frame}", content=data, headers=WANT_DICOM)
        report = client.post(f"/diagnose?frame={frame}", content=data, headers=WANT_DICOM)
        assert seg.status_code == report.status_code == 200, name
        objects = read_parts(report.headers["content-type"], report.content)
        checks = [("seg", seg.content, "Segmentation")] + [
            (
                f"diagnose-{i}",
                _bytes(ds),
                IOD_OF_CLASS[ds.SOPClassUID],
            )
            for i, ds in enumerate(objects)
        ]
        for label, blob, iod in checks:
            errors = dciodvfy_errors(blob, tmp_path, f"{name}-{label}", iod)
            if errors:
                failures[f"{name}/{label}"] = errors
    assert failures == {}


def test_no_tag_value_reaches_warnings_or_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    ds = dcmread(io.BytesIO(pacs_dicom()))
    ds.PatientName = "PLAINNAME"  # one component: highdicom warns about it, quoting it
    ds.PatientID = "PID-TAG-VALUE-42"
    data = _bytes(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, not only the first of its kind ...
        silence_highdicom_warnings()  # ... except those the service silences at import
        with caplog.at_level(logging.DEBUG):
            objects = diagnose_objects(client, data, "application/dicom")
    assert objects[-1].PatientID == "PID-TAG-VALUE-42"  # the results do carry it, by design
    said = caplog.text + "".join(str(w.message) for w in caught)
    assert "PLAINNAME" not in said and "PID-TAG-VALUE-42" not in said


def test_diagnose_returns_a_presentation_state_drawing_the_srs_outline(client: TestClient) -> None:
    data = pacs_dicom(pixel_spacing=(0.5, 0.5))
    source = header(data)
    seg, sr, pr = diagnose_objects(client, data, "application/dicom")
    assert pr.SOPClassUID == GSPS_STORAGE  # a grey source: a Grayscale Softcopy PS
    assert pr.StudyInstanceUID == source.StudyInstanceUID
    assert pr.SeriesInstanceUID not in (seg.SeriesInstanceUID, sr.SeriesInstanceUID)
    assert "research use" in pr.SeriesDescription.lower()
    (referenced,) = pr.ReferencedSeriesSequence[0].ReferencedImageSequence
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == source.SOPClassUID
    (annotation,) = pr.GraphicAnnotationSequence
    assert annotation.GraphicLayer == "AI"
    (outline,) = annotation.GraphicObjectSequence
    assert (outline.GraphicType, outline.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
    (scoord,) = [i for i in _content(sr) if i.ValueType == "SCOORD"]
    np.testing.assert_array_equal(
        np.asarray(outline.GraphicData, dtype=float), np.asarray(scoord.GraphicData, dtype=float)
    )
    # the SR's finding and the drawn outline share their Tracking UID
    sr_uids = {i.UID for i in _named(_content(sr), "Tracking Unique Identifier")}
    assert outline.TrackingUID in sr_uids
    (text,) = annotation.TextObjectSequence
    probability = client.post("/diagnose", content=data, headers=DICOM).json()["classification"]
    expected = f"{probability['probabilities']['benign']:.0%}"
    assert text.UnformattedTextValue == f"Benign {expected} (AI, research use)"


def test_a_cine_frames_presentation_state_and_report_name_the_frame(client: TestClient) -> None:
    data = pacs_dicom([uniform(100, 96, 80), scan()])
    response = client.post("/diagnose?frame=1", content=data, headers=WANT_DICOM)
    assert response.status_code == 200, response.text
    _, sr, pr = read_parts(response.headers["content-type"], response.content)
    (referenced,) = pr.ReferencedSeriesSequence[0].ReferencedImageSequence
    assert referenced.ReferencedFrameNumber == 2
    frames = {
        int(ref.ReferencedFrameNumber)
        for i in _content(sr)
        if i.ValueType == "IMAGE"
        for ref in i.ReferencedSOPSequence
        if "ReferencedFrameNumber" in ref
    }
    assert frames == {2}


FHIR = {**DICOM, "Accept": "application/fhir+json"}


def test_diagnose_answers_a_fhir_diagnostic_report(client: TestClient) -> None:
    data = pacs_dicom(pixel_spacing=(0.5, 0.5))
    source = header(data)
    expected = client.post("/diagnose", content=data, headers=DICOM).json()
    response = client.post("/diagnose", content=data, headers=FHIR)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/fhir+json"
    report = DiagnosticReport.model_validate(response.json())  # valid FHIR, or this raises
    assert report.status == "preliminary"
    assert RESEARCH_STATEMENT in report.conclusion
    (study,) = report.imagingStudy
    assert study.identifier.system == "urn:dicom:uid"
    assert study.identifier.value == f"urn:oid:{source.StudyInstanceUID}"
    assert report.subject.identifier.value == source.PatientID
    contained = {r.id: r for r in report.contained}
    devices = {
        r.deviceName[0].name: r.version[0].value
        for r in contained.values()
        if r.__resource_type__ == "Device"
    }
    assert devices == {"tiny-classification": "v1", "tiny-segmentation": "v1"}
    assert [ref.reference for ref in report.result] == ["#finding", "#lesion-1"]
    finding = contained["finding"]
    assert finding.valueCodeableConcept.coding[0].display == "Benign"
    probabilities = {c.code.text: c.valueQuantity.value for c in finding.component}
    for name, p in expected["classification"]["probabilities"].items():
        assert float(probabilities[f"Probability of {name}"]) == pytest.approx(p, abs=1e-6)
    lesion = contained["lesion-1"]
    area = {c.code.text: c.valueQuantity for c in lesion.component}["Area"]
    assert area.unit == "mm2"
    assert float(area.value) == pytest.approx(json_mask(client, data).sum() * 0.25)


def test_a_fhir_report_of_a_png_has_no_study_to_cite(client: TestClient) -> None:
    response = client.post(
        "/diagnose", content=png(uniform(10, 96, 80)), headers={"Accept": "application/fhir+json"}
    )
    assert response.status_code == 200, response.text
    report = DiagnosticReport.model_validate(response.json())
    assert report.imagingStudy is None and report.subject is None
    assert [ref.reference for ref in report.result] == ["#finding"]  # normal: no lesion


def test_a_monochrome1_sources_presentation_state_keeps_its_inversion(
    client: TestClient, tmp_path: Path
) -> None:
    ds = dcmread(io.BytesIO(pacs_dicom()))
    ds.PhotometricInterpretation = "MONOCHROME1"
    *_, pr = diagnose_objects(client, _bytes(ds), "application/dicom")
    assert pr.SOPClassUID == GSPS_STORAGE
    assert pr.PresentationLUTShape == "INVERSE"
    assert dciodvfy_errors(_bytes(pr), tmp_path, "monochrome1-pr", IOD_OF_CLASS[GSPS_STORAGE]) == []
