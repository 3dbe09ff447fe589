"""POST /dicomweb/studies[/{study}]: a STOW-RS entry point that analyses what a PACS sends.

Each instance is diagnosed as POST /diagnose?frame=all would: every frame of a cine loop (at
most MAX_CINE_FRAMES; a longer loop fails with Out of Resources, 0xA700), and its SEG and SR are
those of the key frame (the largest lesion), made from that analysis (with the source's header as
the decoder read it) and sent on to RESULTS_STOW_URL when one is configured. Nothing is kept:
"stored" in the response means analysed (and, with a results target, delivered); an instance
that could not be analysed or whose results could not be delivered is listed as failed, so the
sender can retry it.
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydicom import dcmread

from service.deps import PredictorDep, RuntimeDep
from service.dicom_output import DicomResults, DicomResultsDep
from service.dicom_results import DICOM_MEDIA_TYPE, to_bytes
from service.errors import UnsupportedMediaTypeError
from service.metrics import ServiceMetrics
from service.predictors import ALL_FRAMES, ImageRequest, Predictor, TooManyFramesError
from service.schemas import error_responses
from service.settings import Settings
from service.stow import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    DICOM_JSON_MEDIA_TYPE,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    MalformedMultipartError,
    Part,
    StowClient,
    StowResponse,
    media_type_params,
    split_multipart,
)
from shared import errors as domain

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

_BINARY = {"type": "string", "format": "binary"}
_MULTIPART_DICOM = f'multipart/related; type="{DICOM_MEDIA_TYPE}"'
STOW_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "PS3.18 10.5 STOW-RS: one or more PS3.10 DICOM files, each a part of "
        'a multipart/related body with type="application/dicom"',
        "content": {_MULTIPART_DICOM: {"schema": _BINARY}},
    }
}
_STOW_RESPONSE_SCHEMA = {
    "type": "object",
    "description": "DICOM JSON (PS3.18 F.2): Referenced SOP Sequence (00081199), the analysed "
    "instances; Failed SOP Sequence (00081198), the others, each with its Failure Reason "
    "(00081197): 0xC000 (49152) unreadable or unusable image, 0x0122 (290) not an ultrasound "
    "image, 0xA900 (43264) not of the study in the URL, 0xA700 (42752) a cine loop of more "
    "frames than MAX_CINE_FRAMES, 0x0110 (272) results not delivered to RESULTS_STOW_URL (retry "
    "later)",
}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Every instance was analysed (and its results delivered)",
        "content": {DICOM_JSON_MEDIA_TYPE: {"schema": _STOW_RESPONSE_SCHEMA}},
    },
    202: {
        "description": "Some instances failed; see the Failed SOP Sequence",
        "content": {DICOM_JSON_MEDIA_TYPE: {"schema": _STOW_RESPONSE_SCHEMA}},
    },
    409: {
        "description": "No instance could be analysed or delivered",
        "content": {DICOM_JSON_MEDIA_TYPE: {"schema": _STOW_RESPONSE_SCHEMA}},
    },
    **error_responses(400, 413, 415, 503),
}

# The Failure Reason of each domain error an instance can meet; any other input error: C000.
_REASON_BY_ERROR: dict[type[domain.BusiError], int] = {
    domain.NonImageDicomError: SOP_CLASS_NOT_SUPPORTED,
    domain.NotUltrasoundError: SOP_CLASS_NOT_SUPPORTED,
    TooManyFramesError: OUT_OF_RESOURCES,
}


def _failure_reason(exc: domain.InputError) -> int:
    for cls in type(exc).__mro__:
        if cls in _REASON_BY_ERROR:
            return _REASON_BY_ERROR[cls]
    return CANNOT_UNDERSTAND


def _dicom_parts(request: Request, body: bytes) -> list[Part]:
    media_type, params = media_type_params(request.headers.get("content-type", ""))
    if media_type != "multipart/related" or params.get("type", "").lower() != DICOM_MEDIA_TYPE:
        raise UnsupportedMediaTypeError(
            'send multipart/related; type="application/dicom" (PS3.18 STOW-RS); DICOM JSON and '
            "bulk data are not accepted"
        )
    if not params.get("boundary"):
        raise MalformedMultipartError("the multipart/related Content-Type has no boundary")
    return split_multipart(body, params["boundary"])


def _identifiers(data: bytes) -> tuple[str, str, str] | None:
    """(SOP class, SOP instance, study) UIDs from the header, or None if it cannot be read."""
    try:
        ds = dcmread(
            BytesIO(data),
            force=False,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
    except Exception:
        return None
    return (
        str(ds.get("SOPClassUID", "")),
        str(ds.get("SOPInstanceUID", "")),
        str(ds.get("StudyInstanceUID", "")),
    )


def _store(
    parts: list[Part],
    study: str | None,
    predictor: Predictor,
    dicom: DicomResults,
    settings: Settings,
    metrics: ServiceMetrics,
) -> StowResponse:
    """Analyse each part, deliver its results; one worker thread, one instance at a time."""
    answer = StowResponse()
    client = None
    if settings.RESULTS_STOW_URL:
        client = StowClient(
            settings.RESULTS_STOW_URL,
            username=settings.RESULTS_STOW_USERNAME,
            password=settings.RESULTS_STOW_PASSWORD.get_secret_value(),
            token=settings.RESULTS_STOW_TOKEN.get_secret_value(),
            attempts=settings.RESULTS_STOW_ATTEMPTS,
            timeout_s=settings.RESULTS_STOW_TIMEOUT_S,
        )
    try:
        for index, part in enumerate(parts):
            ids, reason = _store_one(part, study, predictor, dicom, client, metrics)
            if reason is None:
                answer.stored.append(ids[:2])
                metrics.dicomweb_instances.labels("analysed").inc()
            else:
                answer.failed.append((*ids[:2], reason))
                metrics.dicomweb_instances.labels("failed").inc()
                log.info("STOW-RS part %d failed with reason 0x%04X", index, reason)
    finally:
        if client is not None:
            client.close()
    return answer


def _store_one(
    part: Part,
    study: str | None,
    predictor: Predictor,
    dicom: DicomResults,
    client: StowClient | None,
    metrics: ServiceMetrics,
) -> tuple[tuple[str, str, str], int | None]:
    """The part's (SOP class, SOP instance, study) UIDs ("" where unreadable), and None when
    it was analysed (and delivered), else its Failure Reason."""
    read = _identifiers(part.data)
    ids = read or ("", "", "")
    if part.media_type != DICOM_MEDIA_TYPE or read is None:
        return ids, CANNOT_UNDERSTAND
    if study is not None and ids[2] != study:
        return ids, DATASET_DOES_NOT_MATCH  # PS3.18 10.5.3: not of the study the URL names
    # Every frame of a cine loop: the results are the key frame's, not whichever came first.
    image = ImageRequest(data=part.data, declared_format="dicom", frame=ALL_FRAMES)
    try:
        # One decode: the SEG and SR are made from the analysis, header included.
        objects = dicom.diagnosis(predictor.diagnose(image))
    except domain.ModelUnavailableError:
        raise  # the whole request is a 503: the sender should retry it all
    except domain.InputError as exc:
        return ids, _failure_reason(exc)
    if client is None:
        return ids, None
    delivery = client.store([to_bytes(ds) for ds in objects])
    metrics.results_deliveries.labels("delivered" if delivery.delivered else "failed").inc()
    if not delivery.delivered:
        log.warning("results not delivered after %d tries (%s)", delivery.attempts, delivery.reason)
        return ids, PROCESSING_FAILURE
    return ids, None


async def _stow(
    request: Request,
    study: str | None,
    predictor: PredictorDep,
    dicom: DicomResultsDep,
    runtime: RuntimeDep,
) -> JSONResponse:
    parts = _dicom_parts(request, await request.body())
    request.scope["state"].setdefault("log", {})["instances"] = len(parts)
    answer = await anyio.to_thread.run_sync(
        _store, parts, study, predictor, dicom, runtime.settings, runtime.metrics
    )
    return JSONResponse(
        answer.to_json(), status_code=answer.status_code, media_type=DICOM_JSON_MEDIA_TYPE
    )


@router.post("/studies", responses=STOW_RESPONSES, openapi_extra=STOW_REQUEST_BODY)
async def store_instances(
    request: Request, predictor: PredictorDep, dicom: DicomResultsDep, runtime: RuntimeDep
) -> JSONResponse:
    """STOW-RS: analyse each DICOM instance and send its SEG and SR to RESULTS_STOW_URL."""
    return await _stow(request, None, predictor, dicom, runtime)


@router.post("/studies/{study}", responses=STOW_RESPONSES, openapi_extra=STOW_REQUEST_BODY)
async def store_study_instances(
    request: Request,
    predictor: PredictorDep,
    dicom: DicomResultsDep,
    runtime: RuntimeDep,
    study: Annotated[
        str, Path(pattern=r"^[0-9.]{1,64}$", description="Study Instance UID the instances share")
    ],
) -> JSONResponse:
    """STOW-RS for one study: instances of another study fail with reason 0xA900."""
    return await _stow(request, study, predictor, dicom, runtime)
