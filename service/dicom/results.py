"""DICOM and FHIR results of an analysis, built from the predictor's raw results.

The response layer (service/presentation.py) picks them by `Accept` on /segment and /diagnose, and
STOW-RS ingest (service.dicom.stow) sends them on; both go through `DicomResults`, from the same
`Analysis` the JSON answer is made of. Only a DICOM input has a study to reference. /diagnose's
DICOM answer is the SEG (when there is a lesion), the TID 1500 SR and the presentation state that
draws the finding on the source frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydicom import Dataset

from service.dicom.builders import (
    DICOM_MEDIA_TYPE,
    MANUFACTURER,
    RESEARCH_STATEMENT,
    DicomResultsError,
    build_report,
    build_segmentation,
    generate_result_uid,
    lesion_label,
    source_image,
    tracked_findings,
)
from service.dicom.fhir import FHIR_MEDIA_TYPE, diagnostic_report
from service.dicom.header import ResultSource, result_source
from service.dicom.presentation_state import build_presentation_state
from service.predictors import Analysis
from service.schemas import ErrorResponse
from service.settings import Settings
from shared.errors import BusiError

log = logging.getLogger(__name__)

_BINARY = {"type": "string", "format": "binary"}
MULTIPART_DICOM = f'multipart/related; type="{DICOM_MEDIA_TYPE}"'
PR_SERIES_NUMBER = 9903
NOT_ACCEPTABLE_RESPONSE: dict[int | str, dict[str, Any]] = {
    406: {
        "model": ErrorResponse,
        "description": "DICOM results were asked for a PNG or JPEG input, which has no study "
        "to reference (`dicom_output_needs_dicom_input`)",
    }
}
SEG_CONTENT = {DICOM_MEDIA_TYPE: {"schema": _BINARY}}
FHIR_CONTENT = {
    FHIR_MEDIA_TYPE: {
        "schema": {
            "type": "object",
            "description": "A FHIR R4 DiagnosticReport with its Devices and Observations contained",
        }
    }
}
SEG_AND_SR_CONTENT = {
    DICOM_MEDIA_TYPE: {"schema": _BINARY},
    MULTIPART_DICOM: {"schema": _BINARY},
    **FHIR_CONTENT,
}

T = TypeVar("T")


def _guarded(build: Callable[[], T]) -> T:
    """`build()`, with a failure of highdicom on a header the sanitiser let through answered as
    a 422 (DicomResultsError) rather than a 500; only the exception's type is logged."""
    try:
        return build()
    except BusiError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        log.warning("DICOM results could not be built: %s", type(exc).__name__)
        raise DicomResultsError(
            "DICOM results could not be made from this source's header (JSON results still can)"
        ) from None


@dataclass(frozen=True)
class DicomResults:
    """Builds the SEG, SR, presentation state and FHIR report of an analysed frame with this
    deployment's UID root."""

    uid_root: str
    software_version: str
    # ALLOW_NON_ULTRASOUND_DICOM: the operator asked for other modalities to be analysed
    allow_non_ultrasound: bool = False

    def _source(self, analysis: Analysis) -> ResultSource:
        facts = analysis.image
        return source_image(
            facts.dicom,
            facts.frame,
            facts.n_frames,
            require_ultrasound=not self.allow_non_ultrasound,
        )

    def segmentation(self, analysis: Analysis) -> Dataset:
        """The SEG of the analysed frame. Raises DicomOutputNeedsDicomInputError for a PNG or
        JPEG input, UnreferenceableDicomError for a DICOM without the UIDs to cite and
        NotUltrasoundError for one that does not say Modality US."""
        source = self._source(analysis)
        if analysis.segmentation is None:
            raise ValueError("the analysis has no segmentation")
        segmentation = analysis.segmentation
        return _guarded(
            lambda: build_segmentation(source, segmentation, self.uid_root, self.software_version)
        )

    def diagnosis(self, analysis: Analysis) -> list[Dataset]:
        """[SEG, SR, presentation state] when the finding is a lesion, else [SR, presentation
        state]; raises as `segmentation`."""
        source = self._source(analysis)
        classification = analysis.classification
        if classification is None:
            raise ValueError("the analysis has no classification")
        segmentation = analysis.segmentation
        seg = self.segmentation(analysis) if segmentation is not None else None
        regions = tracked_findings(segmentation, self.uid_root)
        report = _guarded(
            lambda: build_report(
                source,
                classification,
                segmentation,
                seg,
                self.uid_root,
                self.software_version,
                regions,
            )
        )
        label = lesion_label(
            classification.label, classification.probabilities[classification.label]
        )
        state = _guarded(
            lambda: build_presentation_state(
                source,
                regions,
                label=label,
                series_instance_uid=generate_result_uid(self.uid_root),
                sop_instance_uid=generate_result_uid(self.uid_root),
                series_number=PR_SERIES_NUMBER,
                manufacturer=MANUFACTURER,
                model_name=(segmentation or classification).model.name,
                software_version=self.software_version,
            )
        )
        return [seg, report, state] if seg is not None else [report, state]

    def fhir_report(self, analysis: Analysis) -> dict[str, Any]:
        """The FHIR R4 DiagnosticReport (as JSON) of the analysis; any input, DICOM or not.
        For a DICOM input it cites the study and patient when the header has valid ones."""
        classification = analysis.classification
        if classification is None:
            raise ValueError("the analysis has no classification")
        facts = analysis.image
        study = patient = spacing = None
        if facts.dicom is not None:
            try:
                source = result_source(
                    facts.dicom,
                    facts.frame,
                    facts.n_frames,
                    require_ultrasound=not self.allow_non_ultrasound,
                )
            except BusiError:  # not referenceable or not US: the report stands without
                source = None
            if source is not None:
                study = str(source.view.StudyInstanceUID)
                patient = str(source.view.PatientID) or None
                spacing = source.pixel_spacing_mm
        report = diagnostic_report(
            classification,
            analysis.segmentation,
            study_instance_uid=study,
            patient_id=patient,
            pixel_spacing_mm=spacing,
            manufacturer=MANUFACTURER,
            statement=RESEARCH_STATEMENT,
        )
        return report.model_dump(mode="json", exclude_none=True)


async def get_dicom_results(request: Request) -> DicomResults:
    """On the event loop: a lookup needs no worker thread (see service.deps)."""
    settings: Settings = request.app.state.runtime.settings
    return DicomResults(
        settings.DICOM_UID_ROOT, request.app.version, settings.ALLOW_NON_ULTRASOUND_DICOM
    )


DicomResultsDep = Annotated[DicomResults, Depends(get_dicom_results)]
