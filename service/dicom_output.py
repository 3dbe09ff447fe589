"""The DICOM face of the inference endpoints: which requests want DICOM, and the responses.

`Accept: application/dicom` on /segment gives the SEG as the body; on /diagnose, that or
`multipart/related; type="application/dicom"` gives a multipart/related body with the SR and,
when the finding is a lesion, the SEG before it. Only a DICOM input has a study to reference, so a
PNG or JPEG asking for DICOM is refused with 406 before any model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from pydicom import Dataset

from service.dicom_results import (
    DICOM_MEDIA_TYPE,
    NEEDS_DICOM_MESSAGE,
    DicomOutputNeedsDicomInputError,
    SourceImage,
    build_report,
    build_segmentation,
    decode_mask,
    multipart_related,
    read_source,
    to_bytes,
)
from service.predictors import Diagnosis, ImageFacts, ImageRequest, Segmentation
from service.schemas import ErrorResponse
from service.settings import Settings
from shared.decoding import sniff_format

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


def accepted_dicom(request: Request, *, multipart: bool) -> bool:
    """True when the Accept header's first type this endpoint can produce is DICOM:
    application/dicom, or (with `multipart`) multipart/related with type application/dicom."""
    for item in request.headers.get("accept", "").split(","):
        fields = [f.strip() for f in item.split(";")]
        media_type = fields[0].lower()
        if media_type == DICOM_MEDIA_TYPE:
            return True
        if multipart and media_type == "multipart/related":
            params = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
            if params.get("type", "").strip('"').lower() == DICOM_MEDIA_TYPE:
                return True
        if media_type in ("application/json", "application/*", "image/png", "*/*"):
            return False
    return False


@dataclass(frozen=True)
class DicomResults:
    """Builds the SEG and SR of one analysed frame with this deployment's UID root."""

    uid_root: str
    software_version: str

    def source(self, image: ImageRequest) -> SourceImage:
        """The source's header, read before any model runs; raises the 406 for PNG / JPEG."""
        if sniff_format(image.data) != "dicom":
            raise DicomOutputNeedsDicomInputError(NEEDS_DICOM_MESSAGE)
        return read_source(image.data, image.frame)

    def segmentation(
        self, source: SourceImage, facts: ImageFacts, segmentation: Segmentation
    ) -> Dataset:
        source = replace(source, frame=facts.frame)
        mask = decode_mask(segmentation.mask_png)
        return build_segmentation(source, mask, segmentation, self.uid_root, self.software_version)

    def diagnosis(self, source: SourceImage, diagnosis: Diagnosis) -> list[Dataset]:
        """[SEG, SR] when the finding is a lesion, else [SR]."""
        source = replace(source, frame=diagnosis.image.frame)
        seg = None
        if diagnosis.segmentation is not None:
            seg = self.segmentation(source, diagnosis.image, diagnosis.segmentation)
        report = build_report(
            source,
            diagnosis.classification,
            diagnosis.segmentation,
            seg,
            self.uid_root,
            self.software_version,
        )
        return [seg, report] if seg is not None else [report]

    def segment_response(
        self, source: SourceImage, facts: ImageFacts, segmentation: Segmentation
    ) -> Response:
        seg = self.segmentation(source, facts, segmentation)
        return Response(to_bytes(seg), media_type=DICOM_MEDIA_TYPE)

    def diagnose_response(self, source: SourceImage, diagnosis: Diagnosis) -> Response:
        objects = self.diagnosis(source, diagnosis)
        body, content_type = multipart_related([to_bytes(ds) for ds in objects])
        return Response(body, headers={"Content-Type": content_type})


def get_dicom_results(request: Request) -> DicomResults:
    settings: Settings = request.app.state.runtime.settings
    return DicomResults(settings.DICOM_UID_ROOT, request.app.version)


DicomResultsDep = Annotated[DicomResults, Depends(get_dicom_results)]
