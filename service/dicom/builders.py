"""DICOM results of one analysed frame: a Segmentation (SEG) and a TID 1500 Structured Report (SR).

A PACS shows DICOM, not JSON, so for a DICOM input the service can answer with objects a viewer
lays over the source: a binary SEG with one SNOMED-coded "Lesion" segment on the source's pixel
grid, and a Comprehensive SR holding the TID 1500 measurement report (the coded finding, the class
probabilities, each lesion region with its outline, area and size, the models that made them, and
the statement that this is research software). Both reference the source study, series, instance
and frame and carry fresh UIDs under the configured root; both are built with highdicom from the
source's header as `service.dicom.header` sanitised it (shared.decoding keeps the header, without
the pixel data, beside the frame) and from the predictor's raw results (the mask as an array).
The presentation state that draws the outline is `service.dicom.presentation_state`'s.

Nothing from the header is ever logged: these objects carry patient data by design (they belong to
the patient's study), so they go to the client or to the configured STOW-RS target only.
"""

from __future__ import annotations

import io
import secrets
import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from service.dicom.header import (
    ResultSource,
    UnreferenceableDicomError,
    restore_references,
    result_source,
)
from service.dicom.outline import TrackedFinding, findings
from service.predictors import Classification, Segmentation
from shared.errors import InputError
from shared.labels import CLASS_NAMES


# highdicom warns about odd attribute values it copies from the source (e.g. a one-component
# Patient's Name), quoting the value: warnings can reach logs, patient data must not.
def silence_highdicom_warnings() -> None:
    """Install the filter (done at import; again by whoever resets the warning filters)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\.|$)")


silence_highdicom_warnings()

DICOM_MEDIA_TYPE = "application/dicom"
RESEARCH_STATEMENT = (
    "Research use only; not for diagnosis. Produced automatically by a machine-learning model "
    "that has not been validated for clinical use."
)
MANUFACTURER = "busi-service"
NEEDS_DICOM_MESSAGE = (
    "DICOM results (SEG, SR) reference the source study, which only a DICOM input has; send a "
    "DICOM image, or ask for application/json (or image/png from /segment)"
)
# Series numbers of the results, high so that they sort after the acquisition's own series.
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
# PS3.5 9.1: a UID is at most 64 characters; the random suffix fills what the root leaves.
_UID_MAX_LENGTH = 64
_MIN_RANDOM_DIGITS = 20

# CID 7151 / 7150: the segment's coded property; CID 6050-ish finding values.
FINDING_CODES = {
    "normal": codes.SCT.Normal,
    "benign": codes.SCT.Benign,
    "malignant": codes.SCT.Malignant,
}
# No standard concept names the probability of each of our three classes, so they are private
# codes (PS3.16 8.2: a coding scheme designator starting with "99" is a local one).
PRIVATE_SCHEME = "99BUSI"
PROBABILITY_CODES = {
    name: hd.sr.CodedConcept(f"P-{name.upper()}", PRIVATE_SCHEME, f"Probability of {name}")
    for name in CLASS_NAMES
}
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
# UCUM annotation: lengths and areas in pixels where the source gives no Pixel Spacing.
_PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")
_MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
_MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


class DicomOutputNeedsDicomInputError(InputError):
    """DICOM results were asked for a PNG or JPEG input: there is no study to reference."""

    code = "dicom_output_needs_dicom_input"


def generate_result_uid(root: str) -> str:
    """A new UID: `<root>.<random digits>` when a root is configured, else a UUID-derived `2.25.`
    UID (PS3.5 B.2), which needs no registered root. Never the same twice."""
    root = root.strip().rstrip(".")
    if not root:
        return generate_uid(prefix=None)
    digits = _UID_MAX_LENGTH - len(root) - 1
    if digits < _MIN_RANDOM_DIGITS:
        raise ValueError(f"UID root {root!r} leaves fewer than {_MIN_RANDOM_DIGITS} digits")
    # A leading zero is not allowed in a UID component (PS3.5 9.1).
    return f"{root}.{secrets.randbelow(9 * 10 ** (digits - 1)) + 10 ** (digits - 1)}"


class DicomResultsError(UnreferenceableDicomError):
    """highdicom could not build a result from a source header the sanitiser let through: a
    case `service.dicom.header` does not handle yet (a 422 rather than a 500; the corpus test
    keeps it from happening on every header we know of)."""

    code = "dicom_results_failed"


def source_image(
    header: Dataset | None, frame: int, n_frames: int = 1, *, require_ultrasound: bool = True
) -> ResultSource:
    """The source of results: the decoded DICOM's header, sanitised, and the analysed frame
    (0-based) of its `n_frames`.

    Raises DicomOutputNeedsDicomInputError when there is no header (a PNG or JPEG input),
    UnreferenceableDicomError when a UID or the image size is missing or invalid, and
    NotUltrasoundError when the header does not say Modality US (with `require_ultrasound`).
    """
    if header is None:
        raise DicomOutputNeedsDicomInputError(NEEDS_DICOM_MESSAGE)
    return result_source(header, frame, n_frames, require_ultrasound=require_ultrasound)


def _algorithm(model_name: str, model_version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model_name,
        version=model_version,
        family=codes.DCM.ArtificialIntelligence,
        source=MANUFACTURER,
    )


def build_segmentation(
    source: ResultSource,
    segmentation: Segmentation,
    uid_root: str,
    software_version: str,
) -> hd.seg.Segmentation:
    """A binary SEG of the analysed frame: one "Lesion" segment, the source's geometry."""
    view = source.view
    mask = segmentation.mask > 0
    if mask.shape != (int(view.Rows), int(view.Columns)):
        raise ValueError("the mask does not have the source's rows and columns")
    model = segmentation.model
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(model.name, model.version),
        anatomic_regions=[codes.SCT.Breast],
        tracking_id="Lesion",
        tracking_uid=generate_result_uid(uid_root),
    )
    seg = hd.seg.Segmentation(
        source_images=[view],
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_result_uid(uid_root),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_result_uid(uid_root),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=[software_version, f"{model.name} {model.version}"],
        device_serial_number="none",
        content_description="AI lesion outline; " + RESEARCH_STATEMENT[:40],
        content_label="LESION",
        series_description="AI lesion segmentation (research use, not for diagnosis)",
        omit_empty_frames=False,  # an empty outline is a result too: one frame, always
    )
    restore_references(seg, source)
    # PS3.3 C.7.6.1: Type 2C when the image has no Frame of Reference, as the view has not.
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = view.PatientOrientation
    return seg


def _classification(label: str) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=codes.SCT.Classification, value=FINDING_CODES[label])


def _segment_reference(
    seg: hd.seg.Segmentation, source: ResultSource
) -> hd.sr.ReferencedSegmentationFrame:
    """The SEG's segment 1 and the frame it outlines.

    highdicom writes both Referenced Frame Number and Referenced Segment Number into the item
    that cites the SEG, which PS3.3 C.10.3 (Image SOP Instance Reference Macro) forbids: with a
    segment number, the frame number "shall not be present". The SEG has one frame, so the
    segment number alone names it.
    """
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=1,
        segment_number=1,
        source_image=hd.sr.SourceImageForSegmentation(
            source.sop_class_uid, source.sop_instance_uid, source.frame_numbers
        ),
    )
    for item in reference:
        for cited in item.get("ReferencedSOPSequence", []):
            if "ReferencedSegmentNumber" in cited and "ReferencedFrameNumber" in cited:
                del cited.ReferencedFrameNumber
    return reference


def _length_and_unit(pixels: float, spacing: float | None) -> tuple[float, hd.sr.CodedConcept]:
    return (pixels * spacing, _MM) if spacing else (float(pixels), _PIXELS)


def _area_and_unit(
    pixels: float, spacing: tuple[float, float] | None
) -> tuple[float, hd.sr.CodedConcept]:
    if spacing:
        return pixels * spacing[0] * spacing[1], _MM2
    return float(pixels), _PIXELS  # a count of pixels


def tracked_findings(segmentation: Segmentation | None, uid_root: str) -> list[TrackedFinding]:
    """The mask's findings, each with a new Tracking UID; none without a segmentation."""
    if segmentation is None:
        return []
    return [TrackedFinding(f, generate_result_uid(uid_root)) for f in findings(segmentation.mask)]


def lesion_label(finding: str, probability: float) -> str:
    """The short text a viewer shows beside an outline: the finding and its probability."""
    return f"{finding.capitalize()} {probability:.0%} (AI, research use)"


def _lesion_groups(
    source: ResultSource,
    label: str,
    segmentation: Segmentation,
    seg: hd.seg.Segmentation,
    uid_root: str,
    regions: Sequence[TrackedFinding],
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 groups: the lesion as the SEG's segment with its area, then each region of
    the mask as a finding of its own, with its outline (a SCOORD polyline on the source frame
    that viewers draw), its area and the size of its bounding box."""
    model = segmentation.model
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    spacing = source.pixel_spacing_mm
    area, area_unit = _area_and_unit(np.count_nonzero(segmentation.mask), spacing)
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_result_uid(uid_root), identifier="Lesion"
            ),
            referenced_segment=_segment_reference(seg, source),
            finding_type=codes.SCT.Lesion,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)],
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=area, unit=area_unit)],
            qualitative_evaluations=[_classification(label)],
        )
    ]
    for number, tracked in enumerate(regions, start=1):
        finding = tracked.finding
        area, area_unit = _area_and_unit(finding.pixels, spacing)
        _, _, width, height = finding.bbox
        box_width, width_unit = _length_and_unit(width, spacing[1] if spacing else None)
        box_height, height_unit = _length_and_unit(height, spacing[0] if spacing else None)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracked.uid, identifier=f"Lesion {number}"
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=finding.outline,
                    source_image=hd.sr.SourceImageForRegion(
                        source.sop_class_uid, source.sop_instance_uid, source.frame_numbers
                    ),
                ),
                finding_type=codes.SCT.Lesion,
                finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.Area, value=area, unit=area_unit),
                    hd.sr.Measurement(name=codes.SCT.Width, value=box_width, unit=width_unit),
                    hd.sr.Measurement(name=codes.DCM.Height, value=box_height, unit=height_unit),
                ],
                qualitative_evaluations=[_classification(label)],
            )
        )
    return groups


def build_report(
    source: ResultSource,
    classification: Classification,
    segmentation: Segmentation | None,
    seg: hd.seg.Segmentation | None,
    uid_root: str,
    software_version: str,
    regions: Sequence[TrackedFinding] | None = None,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR with the TID 1500 measurement report of one analysed frame.

    The observer is the device (TID 1004: our name as manufacturer, the classifier as model).
    One image-level group (TID 1501) holds the coded finding and the probability of each class,
    with the classifier's name and version (TID 4019); when there is an outline (`segmentation`
    and `seg`), TID 1410 groups add the lesion (the SEG's segment, its area) and each region of
    it as a finding with a tracking identifier and UID, its SCOORD outline, area and size, with
    the segmenter's name and version; `regions` are the mask's findings with their Tracking UIDs
    (found, with new UIDs, when not given), which a presentation state shares. The research-use
    statement is a text comment under the report's qualitative evaluations.
    """
    label = classification.label
    model = classification.model
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=None, entropy_srcs=[MANUFACTURER]),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}",
        ),
    )
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_result_uid(uid_root), identifier="Image classification"
        ),
        finding_type=FINDING_CODES[label],  # TID 1501 row 3: the coded finding itself
        finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)],
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version),
        measurements=[
            hd.sr.Measurement(name=PROBABILITY_CODES[name], value=float(p), unit=_UNITLESS)
            for name, p in classification.probabilities.items()
            if name in PROBABILITY_CODES
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                source.sop_class_uid, source.sop_instance_uid, source.frame_numbers
            )
        ],
    )
    groups: list = [image_group]
    if segmentation is not None and seg is not None:
        if regions is None:
            regions = tracked_findings(segmentation, uid_root)
        groups.extend(_lesion_groups(source, label, segmentation, seg, uid_root, regions))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.UltrasonographyOfBreast,
        imaging_measurements=groups,
    )
    _add_statement(report, RESEARCH_STATEMENT)
    evidence: list[Dataset] = [source.view] + ([seg] if seg is not None else [])
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_result_uid(uid_root),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_result_uid(uid_root),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # nobody has verified it, and nobody should take it as final
        is_verified=False,
        series_description="AI findings (research use, not for diagnosis)",
        software_versions=software_version,
    )
    restore_references(sr, source)
    # PS3.3 C.12.1.1.2.1: a local coding scheme is named in the Coding Scheme Identification.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "busi-service local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _add_statement(report: hd.sr.MeasurementReport, text: str) -> None:
    """TID 1500 row 12: a Qualitative Evaluations container, here with one text comment."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    report[0].ContentSequence.append(container)


def to_bytes(dataset: Dataset) -> bytes:
    """A PS3.10 file (preamble, DICM, file meta) of a highdicom object."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
