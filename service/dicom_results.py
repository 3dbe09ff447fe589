"""DICOM results of one analysed frame: a Segmentation (SEG) and a TID 1500 Structured Report (SR).

A PACS shows DICOM, not JSON, so for a DICOM input the service can answer with objects a viewer
lays over the source: a binary SEG with one SNOMED-coded "Lesion" segment on the source's pixel
grid, and a Comprehensive SR holding the TID 1500 measurement report (the coded finding, the class
probabilities, the lesion's area and bounding box, the models that made them, and the statement
that this is research software). Both reference the source study, series, instance and frame and
carry fresh UIDs under the configured root; both are built with highdicom from the source's header
as the decoder read it (shared.decoding keeps it, without the pixel data, beside the frame) and
from the predictor's raw results (the mask as an array).

Nothing from the header is ever logged: these objects carry patient data by design (they belong to
the patient's study), so they go to the client or to the configured STOW-RS target only.
"""

from __future__ import annotations

import io
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom._standard_utils import is_multiframe_image
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

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
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
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


class UnreferenceableDicomError(InputError):
    """The source DICOM lacks the identifiers (study, series, instance UIDs) a result must cite."""

    code = "dicom_not_referenceable"


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


@dataclass(frozen=True)
class SourceImage:
    """The source DICOM's header (no pixels) and which of its frames was analysed (0-based)."""

    header: Dataset
    frame: int

    @property
    def multiframe(self) -> bool:
        """Whether the source's IOD is a multi-frame one, whose frames are referenced by number
        (a single-frame IOD's object is referenced whole, even with a Number of Frames)."""
        return is_multiframe_image(self.header)

    @property
    def frame_numbers(self) -> list[int] | None:
        """The 1-based Referenced Frame Number list of the analysed frame; None when the source
        is a single-frame object (which is then referenced whole)."""
        return [self.frame + 1] if self.multiframe else None

    @property
    def pixel_spacing_mm(self) -> tuple[float, float] | None:
        """(row, column) spacing from Pixel Spacing, when the source has a usable one."""
        spacing = self.header.get("PixelSpacing")
        if spacing is None or len(spacing) != 2:
            return None
        row, column = float(spacing[0]), float(spacing[1])
        if not (row > 0 and column > 0 and np.isfinite(row) and np.isfinite(column)):
            return None
        return row, column


_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def source_image(header: Dataset | None, frame: int) -> SourceImage:
    """The source of results: the decoded DICOM's header and the analysed frame (0-based),
    checked to be one that results can reference.

    Raises DicomOutputNeedsDicomInputError when there is no header (a PNG or JPEG input) and
    UnreferenceableDicomError when a UID or the image size is missing.
    """
    if header is None:
        raise DicomOutputNeedsDicomInputError(NEEDS_DICOM_MESSAGE)
    try:
        missing = [name for name in (*_REQUIRED_UIDS, "Rows", "Columns") if not header.get(name)]
    except Exception:  # an element pydicom cannot convert; its message may quote values
        raise UnreferenceableDicomError("the DICOM header cannot be read") from None
    if missing:
        raise UnreferenceableDicomError(
            "DICOM results must reference the source, which lacks " + ", ".join(missing)
        )
    charsets = _character_sets(header)
    if charsets - _RESULT_CHARSETS:
        # Results copy the source's patient and study text, so they are written in its
        # character set; highdicom knows DICOM's defined terms only.
        raise UnreferenceableDicomError(
            "the source's Specific Character Set is not a DICOM defined term; DICOM results "
            "cannot be written in it (JSON results still can)"
        )
    return SourceImage(header, frame)


_RESULT_CHARSETS = {value.value for value in hd.SpecificCharacterSetValues} | {""}


def _character_sets(header: Dataset) -> set[str]:
    """The source's Specific Character Set values (one or more; empty when absent)."""
    try:
        value = header.get("SpecificCharacterSet", "")
    except Exception:  # a value pydicom cannot convert; its message may quote it
        return {"<unreadable>"}
    values = [value] if isinstance(value, str) else list(value or [])
    return {str(v).strip() for v in values}


def _algorithm(model_name: str, model_version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=model_name,
        version=model_version,
        family=codes.DCM.ArtificialIntelligence,
        source=MANUFACTURER,
    )


def _single_frame_view(source: SourceImage) -> Dataset:
    """The header as highdicom's single-frame path takes it.

    highdicom (0.28) derives a SEG from a multi-frame image only through its Frame of Reference,
    which ultrasound cine loops do not have; from a single-frame image without one it aligns the
    mask pixel for pixel, which is what a segmented frame is. So a multi-frame source is shown to
    it as a single-frame Secondary Capture image, and `_restore_references` then puts the real SOP
    class and the analysed frame's number (PS3.3 C.7.6.16.2.6) back into the references.
    """
    view = Dataset()
    view.update(source.header)  # its own element dict, the same elements: never edit them
    if "NumberOfFrames" in view:
        del view.NumberOfFrames
    if source.multiframe:
        del view.SOPClassUID  # replaced, not edited: the element is the real header's
        view.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    return view


def _restore_references(seg: hd.seg.Segmentation, source: SourceImage) -> None:
    if not source.multiframe:
        return
    sop_class = source.header.SOPClassUID
    for series in seg.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            item.ReferencedSOPClassUID = sop_class
    for group in seg.PerFrameFunctionalGroupsSequence:
        for derivation in group.DerivationImageSequence:
            for item in derivation.SourceImageSequence:
                item.ReferencedSOPClassUID = sop_class
                item.ReferencedFrameNumber = source.frame + 1


def build_segmentation(
    source: SourceImage,
    segmentation: Segmentation,
    uid_root: str,
    software_version: str,
) -> hd.seg.Segmentation:
    """A binary SEG of the analysed frame: one "Lesion" segment, the source's geometry."""
    header = source.header
    mask = segmentation.mask > 0
    if mask.shape != (int(header.Rows), int(header.Columns)):
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
        source_images=[_single_frame_view(source)],
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
    _restore_references(seg, source)
    # PS3.3 C.7.6.1: Type 2C when the image has no Frame of Reference, as these sources do not.
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        seg.PatientOrientation = source.header.get("PatientOrientation", "")
    return seg


def _classification(label: str) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=codes.SCT.Classification, value=FINDING_CODES[label])


def _region_source(source: SourceImage) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        source.header.SOPClassUID, source.header.SOPInstanceUID, source.frame_numbers
    )


def _segment_reference(
    seg: hd.seg.Segmentation, source: SourceImage
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
            source.header.SOPClassUID, source.header.SOPInstanceUID, source.frame_numbers
        ),
    )
    for item in reference:
        for cited in item.get("ReferencedSOPSequence", []):
            if "ReferencedSegmentNumber" in cited and "ReferencedFrameNumber" in cited:
                del cited.ReferencedFrameNumber
    return reference


def _length_and_unit(pixels: float, spacing: float | None) -> tuple[float, hd.sr.CodedConcept]:
    return (pixels * spacing, _MM) if spacing else (float(pixels), _PIXELS)


def _lesion_groups(
    source: SourceImage,
    label: str,
    segmentation: Segmentation,
    mask: np.ndarray,
    seg: hd.seg.Segmentation,
    uid_root: str,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 groups: the lesion as the SEG's segment with its area, and its bounding box."""
    model = segmentation.model
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    spacing = source.pixel_spacing_mm
    area_pixels = float(np.count_nonzero(mask))
    if spacing:
        area, area_unit = area_pixels * spacing[0] * spacing[1], _MM2
    else:
        area, area_unit = area_pixels, _PIXELS  # a count of pixels
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
    if segmentation.bbox is not None:
        x, y, width, height = segmentation.bbox
        # PS3.3 C.18.6.1.1: (column, row) image coordinates, the top-left pixel's top-left corner
        # at (0, 0), so the box's edges run along pixel borders; a closed POLYLINE repeats the
        # first point.
        corners = np.array(
            [[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]],
            dtype=float,
        )
        box_width, width_unit = _length_and_unit(width, spacing[1] if spacing else None)
        box_height, height_unit = _length_and_unit(height, spacing[0] if spacing else None)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_result_uid(uid_root), identifier="Lesion bounding box"
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=corners,
                    source_image=_region_source(source),
                ),
                finding_type=codes.SCT.Lesion,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.Width, value=box_width, unit=width_unit),
                    hd.sr.Measurement(name=codes.DCM.Height, value=box_height, unit=height_unit),
                ],
            )
        )
    return groups


def build_report(
    source: SourceImage,
    classification: Classification,
    segmentation: Segmentation | None,
    seg: hd.seg.Segmentation | None,
    uid_root: str,
    software_version: str,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR with the TID 1500 measurement report of one analysed frame.

    One image-level group (TID 1501) holds the coded finding and the probability of each class,
    with the classifier's name and version; when there is an outline (`segmentation` and `seg`),
    TID 1410 groups add the lesion (the SEG's segment, its area) and its bounding box, with the
    segmenter's name and version. The research-use statement is a text comment under the
    report's qualitative evaluations.
    """
    header = source.header
    label = classification.label
    model = classification.model
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=None, entropy_srcs=[MANUFACTURER]),
            name=MANUFACTURER,
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
                header.SOPClassUID, header.SOPInstanceUID, source.frame_numbers
            )
        ],
    )
    groups: list = [image_group]
    if segmentation is not None and seg is not None:
        mask = segmentation.mask > 0
        groups.extend(_lesion_groups(source, label, segmentation, mask, seg, uid_root))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.UltrasonographyOfBreast,
        imaging_measurements=groups,
    )
    _add_statement(report, RESEARCH_STATEMENT)
    evidence: list[Dataset] = [header] + ([seg] if seg is not None else [])
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


def multipart_related(
    parts: Sequence[bytes], media_type: str = DICOM_MEDIA_TYPE
) -> tuple[bytes, str]:
    """PS3.18 8.6.1.2 multipart/related body of `parts` and its Content-Type header value."""
    boundary = f"busi-{secrets.token_hex(16)}"
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode("ascii"))
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    content_type = f'multipart/related; type="{media_type}"; boundary={boundary}'
    return b"".join(chunks), content_type
