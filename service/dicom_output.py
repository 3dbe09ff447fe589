"""DICOM results of an analysis: the SEG and the SR, built from the predictor's raw results.

The response layer (service/presentation.py) picks them by `Accept` on /segment and /diagnose, and
the STOW-RS entry point (service/routes/dicomweb.py) sends them on; both go through `DicomResults`,
from the same `Analysis` the JSON answer is made of. Only a DICOM input has a study to reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydicom import Dataset

from service.dicom_results import (
    DICOM_MEDIA_TYPE,
    build_report,
    build_segmentation,
    source_image,
)
from service.predictors import Analysis
from service.schemas import ErrorResponse
from service.settings import Settings

_BINARY = {"type": "string", "format": "binary"}
MULTIPART_DICOM = f'multipart/related; type="{DICOM_MEDIA_TYPE}"'
NOT_ACCEPTABLE_RESPONSE: dict[int | str, dict[str, Any]] = {
    406: {
        "model": ErrorResponse,
        "description": "DICOM results were asked for a PNG or JPEG input, which has no study "
        "to reference (`dicom_output_needs_dicom_input`)",
    }
}
SEG_CONTENT = {DICOM_MEDIA_TYPE: {"schema": _BINARY}}
SEG_AND_SR_CONTENT = {
    DICOM_MEDIA_TYPE: {"schema": _BINARY},
    MULTIPART_DICOM: {"schema": _BINARY},
}


@dataclass(frozen=True)
class DicomResults:
    """Builds the SEG and SR of an analysed frame with this deployment's UID root."""

    uid_root: str
    software_version: str

    def segmentation(self, analysis: Analysis) -> Dataset:
        """The SEG of the analysed frame. Raises DicomOutputNeedsDicomInputError for a PNG or
        JPEG input and UnreferenceableDicomError for a DICOM without the UIDs to cite."""
        source = source_image(analysis.image.dicom, analysis.image.frame)
        if analysis.segmentation is None:
            raise ValueError("the analysis has no segmentation")
        return build_segmentation(
            source, analysis.segmentation, self.uid_root, self.software_version
        )

    def diagnosis(self, analysis: Analysis) -> list[Dataset]:
        """[SEG, SR] when the finding is a lesion, else [SR]; raises as `segmentation`."""
        source = source_image(analysis.image.dicom, analysis.image.frame)
        if analysis.classification is None:
            raise ValueError("the analysis has no classification")
        seg = None
        if analysis.segmentation is not None:
            seg = self.segmentation(analysis)
        report = build_report(
            source,
            analysis.classification,
            analysis.segmentation,
            seg,
            self.uid_root,
            self.software_version,
        )
        return [seg, report] if seg is not None else [report]


def get_dicom_results(request: Request) -> DicomResults:
    settings: Settings = request.app.state.runtime.settings
    return DicomResults(settings.DICOM_UID_ROOT, request.app.version)


DicomResultsDep = Annotated[DicomResults, Depends(get_dicom_results)]
