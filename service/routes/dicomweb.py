"""POST /dicomweb/studies[/{study}]: a STOW-RS entry point that analyses what a PACS sends.

The work is STOW-RS ingest's (service.dicom.stow), whose docstring says what becomes of each
instance; the route checks the delivery backlog and the Content-Type, reads the body, and answers.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from service.deps import AppStateDep, PredictorDep
from service.dicom.builders import DICOM_MEDIA_TYPE
from service.dicom.delivery import ResultsDelivery
from service.dicom.results import DicomResultsDep
from service.dicom.stow import StowIngest, stow_boundary
from service.dicom.stow_client import DICOM_JSON_MEDIA_TYPE
from service.schemas import error_responses

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
    "frames than MAX_CINE_FRAMES, 0x0110 (272) results not made, or not delivered to "
    "RESULTS_STOW_URL in time (retry later)",
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


async def _stow(
    request: Request,
    study: str | None,
    predictor: PredictorDep,
    dicom: DicomResultsDep,
    app_state: AppStateDep,
) -> JSONResponse:
    delivery: ResultsDelivery | None = getattr(request.app.state, "delivery", None)
    if delivery is not None:
        delivery.check_capacity()  # before the body is even read
    boundary = stow_boundary(request.headers.get("content-type"))
    facts = request.scope.setdefault("state", {})
    body = await request.body()
    ingest = StowIngest(predictor, dicom, delivery, app_state.metrics, app_state.settings)
    answer = await ingest.store(body, boundary, study, facts, request.receive)
    return JSONResponse(
        answer.to_json(), status_code=answer.status_code, media_type=DICOM_JSON_MEDIA_TYPE
    )


@router.post("/studies", responses=STOW_RESPONSES, openapi_extra=STOW_REQUEST_BODY)
async def store_instances(
    request: Request, predictor: PredictorDep, dicom: DicomResultsDep, app_state: AppStateDep
) -> JSONResponse:
    """STOW-RS: analyse each DICOM instance and send its SEG and SR to RESULTS_STOW_URL."""
    return await _stow(request, None, predictor, dicom, app_state)


@router.post("/studies/{study}", responses=STOW_RESPONSES, openapi_extra=STOW_REQUEST_BODY)
async def store_study_instances(
    request: Request,
    predictor: PredictorDep,
    dicom: DicomResultsDep,
    app_state: AppStateDep,
    study: Annotated[
        str, Path(pattern=r"^[0-9.]{1,64}$", description="Study Instance UID the instances share")
    ],
) -> JSONResponse:
    """STOW-RS for one study: instances of another study fail with reason 0xA900."""
    return await _stow(request, study, predictor, dicom, app_state)
