"""The diagnosis as a FHIR R4 DiagnosticReport, for the hospital systems that read FHIR.

One self-contained resource (what `Accept: application/fhir+json` on /diagnose returns): the
DiagnosticReport holds, as contained resources, a Device for each model (name, version,
manufacturer), an Observation with the coded finding and each class's probability, and an
Observation per lesion region (its area and size); for a DICOM input it references the
ImagingStudy by its Study Instance UID (FHIR R4 ImagingStudy.identifier, `urn:dicom:uid`) and the
patient by the DICOM Patient ID. Built and validated with fhir.resources' R4B models, whose
DiagnosticReport, Observation and Device are R4's; `preliminary`, since nobody verified it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.sr.codedict import codes

from service.dicom.outline import findings
from service.predictors import Classification, Segmentation
from service.registry import LoadedModel

FHIR_MEDIA_TYPE = "application/fhir+json"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID_SYSTEM = "urn:dicom:uid"
# SNOMED CT concepts, the same as the SR's (pydicom's PS3.16 code dictionary).
FINDINGS = {
    name: (getattr(codes.SCT, name.capitalize()).value, name.capitalize())
    for name in ("normal", "benign", "malignant")
}
_LESION = {"system": SNOMED, "code": "52988006", "display": "Lesion"}
_BREAST = {"system": SNOMED, "code": "76752008", "display": "Breast"}
_CLASSIFICATION = {"system": SNOMED, "code": "278201002", "display": "Classification"}
_AREA = {"system": SNOMED, "code": "42798000", "display": "Area"}
_IMAGING_STUDY = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}


def _device(key: str, model: LoadedModel, manufacturer: str) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": key,
        "manufacturer": manufacturer,
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "version": [{"value": model.version}],
        "type": {"text": "Machine-learning model (research use only)"},
    }


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": unit, "system": UCUM, "code": code}


def diagnostic_report(
    classification: Classification,
    segmentation: Segmentation | None,
    *,
    study_instance_uid: str | None,
    patient_id: str | None,
    pixel_spacing_mm: tuple[float, float] | None,
    manufacturer: str,
    statement: str,
) -> DiagnosticReport:
    """The validated DiagnosticReport of one analysed image (raises pydantic's ValidationError
    only on a bug: every field is ours or checked before)."""
    label = classification.label
    code, display = FINDINGS[label]
    devices = [_device("classifier", classification.model, manufacturer)]
    observations = [
        {
            "resourceType": "Observation",
            "id": "finding",
            "status": "preliminary",
            "code": {"coding": [_CLASSIFICATION], "text": "AI classification of the image"},
            "bodySite": {"coding": [_BREAST]},
            "device": {"reference": "#classifier"},
            "valueCodeableConcept": {
                "coding": [{"system": SNOMED, "code": code, "display": display}],
                "text": display,
            },
            "component": [
                {
                    "code": {"text": f"Probability of {name}"},
                    "valueQuantity": _quantity(p, "1", "1"),
                }
                for name, p in classification.probabilities.items()
            ],
        }
    ]
    if segmentation is not None:
        devices.append(_device("segmenter", segmentation.model, manufacturer))
        for number, finding in enumerate(findings(segmentation.mask), start=1):
            _, _, width, height = finding.bbox
            if pixel_spacing_mm:
                rows_mm, columns_mm = pixel_spacing_mm
                sizes = [
                    ("Area", _quantity(finding.pixels * rows_mm * columns_mm, "mm2", "mm2")),
                    ("Width", _quantity(width * columns_mm, "mm", "mm")),
                    ("Height", _quantity(height * rows_mm, "mm", "mm")),
                ]
            else:
                pixels = "{pixels}"
                sizes = [
                    ("Area", _quantity(finding.pixels, "pixels", pixels)),
                    ("Width", _quantity(width, "pixels", pixels)),
                    ("Height", _quantity(height, "pixels", pixels)),
                ]
            observations.append(
                {
                    "resourceType": "Observation",
                    "id": f"lesion-{number}",
                    "status": "preliminary",
                    "code": {"coding": [_LESION], "text": f"Lesion {number}"},
                    "bodySite": {"coding": [_BREAST]},
                    "device": {"reference": "#segmenter"},
                    "valueCodeableConcept": {
                        "coding": [{"system": SNOMED, "code": code, "display": display}]
                    },
                    "component": [
                        {
                            "code": {"coding": [_AREA], "text": name}
                            if name == "Area"
                            else {"text": name},
                            "valueQuantity": quantity,
                        }
                        for name, quantity in sizes
                    ],
                }
            )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "contained": devices + observations,
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {"coding": [_IMAGING_STUDY], "text": "AI analysis of a breast ultrasound image"},
        "issued": datetime.now(UTC).isoformat(timespec="seconds"),
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": f"{display}. {statement}",
        "conclusionCode": [{"coding": [{"system": SNOMED, "code": code, "display": display}]}],
    }
    if study_instance_uid:
        report["imagingStudy"] = [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "system": DICOM_UID_SYSTEM,
                    "value": f"urn:oid:{study_instance_uid}",
                },
            }
        ]
    if patient_id:
        report["subject"] = {"type": "Patient", "identifier": {"value": patient_id}}
    return DiagnosticReport.model_validate(report)
