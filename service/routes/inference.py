"""POST /classify, /segment and /diagnose."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Response

from service.deps import ImageDep, PredictorDep
from service.dicom.results import NOT_ACCEPTABLE_RESPONSE, SEG_AND_SR_CONTENT, SEG_CONTENT
from service.presentation import (
    CLASSIFY_OFFERS,
    DIAGNOSE_OFFERS,
    SEGMENT_OFFERS,
    PresentationDep,
)
from service.schemas import (
    ClassifyResponse,
    DiagnoseResponse,
    SegmentResponse,
    error_responses,
)

router = APIRouter(tags=["inference"])

_BINARY = {"type": "string", "format": "binary"}
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: a PNG, JPEG or DICOM file, as the multipart field `file` or "
        "as the raw body. The format is decided by the bytes; a declared type that disagrees "
        "is a 415. application/octet-stream is sniffed.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {**_BINARY, "description": "PNG, JPEG or DICOM"}},
                }
            },
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "application/dicom": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}
_ERRORS = error_responses(400, 413, 415, 422, 503)
_ERRORS[422] = {
    **_ERRORS[422],
    "description": _ERRORS[422]["description"] + "; with ?frame=all, a file of more frames than "
    "MAX_CINE_FRAMES (`too_many_frames`)",
}
_NEGOTIATION = (
    " The answer's type follows `Accept` (q-values honoured; JSON when nothing listed can be "
    "produced). For a DICOM input, `source` echoes its Study, Series and SOP Instance UIDs and "
    "the analysed frame. With `?frame=all`, every frame of a cine loop is analysed (at most "
    "MAX_CINE_FRAMES): `cine` lists each frame's result, and the rest of the answer, in every "
    "representation, describes the key frame: the frame with the largest lesion, else the one "
    "most likely a lesion, else the first."
)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=_ERRORS,
    openapi_extra=IMAGE_REQUEST_BODY,
    description="Classify a breast-ultrasound image as normal, benign or malignant." + _NEGOTIATION,
)
async def classify(
    image: ImageDep, predictor: PredictorDep, presentation: PresentationDep
) -> Response:
    """Classify a breast-ultrasound image as normal, benign or malignant."""
    encode = presentation.encoder(CLASSIFY_OFFERS, image)
    return await anyio.to_thread.run_sync(lambda: encode(predictor.classify(image)))


@router.post(
    "/segment",
    response_model=SegmentResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "The lesion mask and its geometry; with `Accept: image/png`, the "
            "mask PNG itself (one channel, the input's size, 0 / 255), with the quality "
            "verdict in the X-In-Distribution and X-Quality-Score headers and the analysed "
            "frame in X-Frame",
            "content": {"image/png": {"schema": _BINARY}, **SEG_CONTENT},
        },
        **NOT_ACCEPTABLE_RESPONSE,
    },
    openapi_extra=IMAGE_REQUEST_BODY,
    description="Segment the lesion: a mask of the input's size, its area fraction and bounding "
    "box; with `Accept: application/dicom` (DICOM inputs only), a DICOM Segmentation of the "
    "frame." + _NEGOTIATION,
)
async def segment(
    image: ImageDep, predictor: PredictorDep, presentation: PresentationDep
) -> Response:
    """Segment the lesion: a mask of the input's size, its area fraction and bounding box; with
    `Accept: application/dicom` (DICOM inputs only), a DICOM Segmentation of the frame."""
    encode = presentation.encoder(SEGMENT_OFFERS, image)
    return await anyio.to_thread.run_sync(lambda: encode(predictor.segment(image)))


@router.post(
    "/diagnose",
    response_model=DiagnoseResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "The diagnosis; with `Accept: application/dicom` or "
            '`multipart/related; type="application/dicom"` (DICOM inputs only), a '
            "multipart/related body: the DICOM Segmentation (when the finding is a lesion), "
            "the TID 1500 Structured Report, then a Softcopy Presentation State that draws "
            "the lesion outline and the finding on the source frame; with `Accept: "
            "application/fhir+json`, a FHIR R4 DiagnosticReport (any input)",
            "content": SEG_AND_SR_CONTENT,
        },
        **NOT_ACCEPTABLE_RESPONSE,
    },
    openapi_extra=IMAGE_REQUEST_BODY,
    description="Classify, then segment when the finding is benign or malignant (else "
    "segmentation null). DICOM results (a DICOM input with Modality US) and a FHIR R4 "
    "DiagnosticReport by `Accept`." + _NEGOTIATION,
)
async def diagnose(
    image: ImageDep,
    predictor: PredictorDep,
    presentation: PresentationDep,
    include_image: Annotated[
        bool,
        Query(description="Also return the analysed frame as a base64 grayscale PNG (image_png)"),
    ] = False,
) -> Response:
    """Classify, then segment when the finding is benign or malignant (else segmentation null)."""
    encode = presentation.encoder(DIAGNOSE_OFFERS, image, include_image=include_image)
    return await anyio.to_thread.run_sync(lambda: encode(predictor.diagnose(image)))
