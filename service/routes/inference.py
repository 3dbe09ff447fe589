"""POST /classify, /segment and /diagnose."""

from __future__ import annotations

import base64
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response

from service.deps import ImageDep, PredictorDep, RequestIdDep
from service.dicom_output import (
    NOT_ACCEPTABLE_RESPONSE,
    SEG_AND_SR_CONTENT,
    SEG_CONTENT,
    DicomResultsDep,
    accepted_dicom,
)
from service.predictors import Classification, ImageFacts, Segmentation
from service.registry import LoadedModel
from service.schemas import (
    BBox,
    ClassificationResult,
    ClassifyResponse,
    DiagnoseResponse,
    ImageInfo,
    ModelRef,
    Quality,
    SegmentationResult,
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


def _model_ref(model: LoadedModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version)


def _image_info(facts: ImageFacts) -> ImageInfo:
    return ImageInfo(
        format=facts.format,
        width=facts.width,
        height=facts.height,
        frame=facts.frame,
        n_frames=facts.n_frames,
    )


def _quality(facts: ImageFacts) -> Quality:
    quality = facts.quality
    return Quality(
        in_distribution=quality.in_distribution,
        score=quality.score,
        reasons=list(quality.reasons),
    )


def _classification(result: Classification) -> dict[str, Any]:
    return {
        "label": result.label,
        "probabilities": result.probabilities,
        "calibrated": result.calibrated,
        "uncertain": result.uncertain,
        "reliable": result.reliable,
        "model": _model_ref(result.model),
    }


def _segmentation(result: Segmentation) -> dict[str, Any]:
    bbox = result.bbox
    return {
        "mask_png": base64.b64encode(result.mask_png).decode("ascii"),
        "lesion_area_fraction": result.lesion_area_fraction,
        "bbox": BBox(x=bbox[0], y=bbox[1], width=bbox[2], height=bbox[3]) if bbox else None,
        "model": _model_ref(result.model),
    }


def _wants_png(request: Request) -> bool:
    """True when the Accept header lists image/png before (or without) application/json."""
    for item in request.headers.get("accept", "").split(","):
        media_type = item.split(";", 1)[0].strip().lower()
        if media_type == "image/png":
            return True
        if media_type in ("application/json", "application/*"):
            return False
    return False


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=_ERRORS,
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def classify(
    image: ImageDep, predictor: PredictorDep, request_id: RequestIdDep
) -> ClassifyResponse:
    """Classify a breast-ultrasound image as normal, benign or malignant."""
    facts, result = await anyio.to_thread.run_sync(predictor.classify, image)
    return ClassifyResponse(
        **_classification(result),
        image=_image_info(facts),
        quality=_quality(facts),
        request_id=request_id,
    )


@router.post(
    "/segment",
    response_model=SegmentResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "The lesion mask and its geometry; with `Accept: image/png`, the "
            "mask PNG itself (one channel, the input's size, 0 / 255), with the quality "
            "verdict in the X-In-Distribution and X-Quality-Score headers",
            "content": {"image/png": {"schema": _BINARY}, **SEG_CONTENT},
        },
        **NOT_ACCEPTABLE_RESPONSE,
    },
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def segment(
    request: Request,
    image: ImageDep,
    predictor: PredictorDep,
    request_id: RequestIdDep,
    dicom: DicomResultsDep,
) -> SegmentResponse | Response:
    """Segment the lesion: a mask of the input's size, its area fraction and bounding box; with
    `Accept: application/dicom` (DICOM inputs only), a DICOM Segmentation of the frame."""
    source = dicom.source(image) if accepted_dicom(request, multipart=False) else None
    facts, result = await anyio.to_thread.run_sync(predictor.segment, image)
    if source is not None:
        return await anyio.to_thread.run_sync(dicom.segment_response, source, facts, result)
    if _wants_png(request):
        return Response(
            result.mask_png,
            media_type="image/png",
            headers={
                "X-Model-Name": result.model.name,
                "X-Model-Version": result.model.version,
                "X-Lesion-Area-Fraction": f"{result.lesion_area_fraction:.6f}",
                "X-In-Distribution": "true" if facts.quality.in_distribution else "false",
                "X-Quality-Score": f"{facts.quality.score:.4f}",
            },
        )
    return SegmentResponse(
        **_segmentation(result),
        image=_image_info(facts),
        quality=_quality(facts),
        request_id=request_id,
    )


@router.post(
    "/diagnose",
    response_model=DiagnoseResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "The diagnosis; with `Accept: application/dicom` or "
            '`multipart/related; type="application/dicom"` (DICOM inputs only), a '
            "multipart/related body: the DICOM Segmentation (when the finding is a lesion), "
            "then the TID 1500 Structured Report",
            "content": SEG_AND_SR_CONTENT,
        },
        **NOT_ACCEPTABLE_RESPONSE,
    },
    openapi_extra=IMAGE_REQUEST_BODY,
)
async def diagnose(
    request: Request,
    dicom: DicomResultsDep,
    image: ImageDep,
    predictor: PredictorDep,
    request_id: RequestIdDep,
    include_image: Annotated[
        bool,
        Query(description="Also return the analysed frame as a base64 grayscale PNG (image_png)"),
    ] = False,
) -> DiagnoseResponse | Response:
    """Classify, then segment when the finding is benign or malignant (else segmentation null)."""
    source = dicom.source(image) if accepted_dicom(request, multipart=True) else None
    run = partial(predictor.diagnose, image, include_image=include_image)
    result = await anyio.to_thread.run_sync(run)
    if source is not None:
        return await anyio.to_thread.run_sync(dicom.diagnose_response, source, result)
    return DiagnoseResponse(
        classification=ClassificationResult(**_classification(result.classification)),
        segmentation=(
            SegmentationResult(**_segmentation(result.segmentation))
            if result.segmentation
            else None
        ),
        image=_image_info(result.image),
        quality=_quality(result.image),
        image_png=(
            base64.b64encode(result.image_png).decode("ascii") if result.image_png else None
        ),
        request_id=request_id,
    )
