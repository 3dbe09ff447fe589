"""POST /dicomweb/studies[/{study}]: a STOW-RS entry point that analyses what a PACS sends.

Each instance is diagnosed as POST /diagnose?frame=all would: every frame of a cine loop (at
most MAX_CINE_FRAMES; a longer loop fails with Out of Resources, 0xA700), and its SEG and SR are
those of the key frame (the largest lesion), made from that analysis (with the source's header as
the decoder read it) and sent on to RESULTS_STOW_URL when one is configured. Nothing is kept:
"stored" in the response means analysed (and, with a results target, delivered); an instance
that could not be analysed or whose results could not be delivered is listed as failed, so the
sender can retry it.

PS3.18 10.5.3: each instance succeeds or fails on its own, and the answer is 200 (all stored),
202 (some failed) or 409 (none stored): one bad instance, even one that trips a bug in making its
results, fails only itself, and results are delivered only for the instances that succeed. The
whole request is refused only before any instance is analysed: 413 past MAX_STOW_INSTANCES parts
or MAX_STOW_PIXELS decoded pixels (counted from the headers while the body is split), 503 when
the models are not loaded, the inference queue is full or RESULTS_STOW_BACKLOG deliveries wait.

Deliveries run on their own lane (service.delivery): async I/O with one deadline each, started as
soon as an instance's results are made, so a slow PACS holds no inference thread. A sender that
hangs up cancels the rest: no further instance is analysed, no further delivery is sent.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from hashlib import sha256
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service.audit import audit_uid
from service.delivery import ResultsDelivery
from service.deps import AppStateDep, PredictorDep
from service.dicom_output import DicomResults, DicomResultsDep
from service.dicom_results import DICOM_MEDIA_TYPE, to_bytes
from service.errors import BodyTooLargeError, UnsupportedMediaTypeError
from service.media_types import parse_media_type
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
    StowResponse,
    iter_multipart,
)
from shared import errors as domain
from shared.decoding import read_dicom_header

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

# The Failure Reason of each domain error an instance can meet; any other input error: C000.
_REASON_BY_ERROR: dict[type[domain.BusiError], int] = {
    domain.NonImageDicomError: SOP_CLASS_NOT_SUPPORTED,
    domain.NotUltrasoundError: SOP_CLASS_NOT_SUPPORTED,
    TooManyFramesError: OUT_OF_RESOURCES,
}


# Errors that say the service, not the instance, cannot go on now: before anything was analysed
# they refuse the whole request (503 / 504, retry it all); after, they fail the instance.
_CAPACITY_ERRORS = (
    domain.ModelUnavailableError,
    domain.ServiceOverloadedError,
    domain.DeadlineExceededError,
)


class StowTooLargeError(BodyTooLargeError):
    """A STOW-RS request of more instances (MAX_STOW_INSTANCES) or more decoded pixels
    (MAX_STOW_PIXELS) than the service takes in one request."""

    code = "stow_too_large"


def _failure_reason(exc: domain.BusiError) -> int:
    """The Failure Reason of an instance that raised `exc`."""
    for cls in type(exc).__mro__:
        if cls in _REASON_BY_ERROR:
            return _REASON_BY_ERROR[cls]
    if isinstance(exc, domain.ServiceOverloadedError | domain.DeadlineExceededError):
        return OUT_OF_RESOURCES
    if isinstance(exc, domain.InputError):
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE  # ours, not the instance's: the sender may retry it


def _boundary(request: Request) -> str:
    media_type = parse_media_type(request.headers.get("content-type"))
    params = media_type.params
    if (
        media_type.essence != "multipart/related"
        or params.get("type", "").lower() != DICOM_MEDIA_TYPE
    ):
        raise UnsupportedMediaTypeError(
            'send multipart/related; type="application/dicom" (PS3.18 STOW-RS); DICOM JSON and '
            "bulk data are not accepted"
        )
    if not params.get("boundary"):
        raise MalformedMultipartError("the multipart/related Content-Type has no boundary")
    return params["boundary"]


@dataclass
class _Instance:
    """One part of the request, what its header says, and what became of it."""

    part: Part
    sop_class: str = ""
    sop_instance: str = ""
    study: str = ""
    readable: bool = False
    pixels: int = 0
    reason: int | None = None  # the Failure Reason; None: stored
    results: list[bytes] | None = None
    delivery_failure: str = ""  # why its results were not delivered: no payload, no PHI
    done: bool = False  # its outcome is known (a hang-up or a refusal leaves the rest undone)

    @property
    def outcome(self) -> str:
        if not self.done:
            return "not_processed"
        return "stored" if self.reason is None else "failed"


# What STOW-RS ingest reads of each part before analysing any: its identity and its size.
_HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _read_header(instance: _Instance) -> None:
    """The UIDs and pixel count from the part's header, without its pixels; unreadable: none
    (the instance fails with 0xC000, nothing is logged)."""
    ds = read_dicom_header(instance.part.data, _HEADER_KEYWORDS)
    if ds is None:
        return
    try:
        instance.sop_class = str(ds.get("SOPClassUID", ""))
        instance.sop_instance = str(ds.get("SOPInstanceUID", ""))
        instance.study = str(ds.get("StudyInstanceUID", ""))
        rows, columns = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
        frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    except Exception:  # a value pydicom cannot convert: unreadable too
        return
    instance.readable = True
    instance.pixels = max(0, rows) * max(0, columns) * frames


def _received(body: bytes, boundary: str, settings: Settings, state: dict) -> list[_Instance]:
    """The request's instances, headers read; raises StowTooLargeError as soon as the parts or
    their pixels pass the caps, before any instance is analysed."""
    instances: list[_Instance] = []
    pixels = 0
    for part in iter_multipart(body, boundary):
        if len(instances) == settings.MAX_STOW_INSTANCES:
            state["stow"] = {
                "bytes": len(body),
                "parts_at_least": len(instances) + 1,
                "refused_by": "MAX_STOW_INSTANCES",
            }
            raise StowTooLargeError(
                f"the request holds more than {settings.MAX_STOW_INSTANCES} instances "
                "(MAX_STOW_INSTANCES); send them in several requests"
            )
        instance = _Instance(part)
        _read_header(instance)
        instances.append(instance)
        pixels += instance.pixels
        if pixels > settings.MAX_STOW_PIXELS:
            state["stow"] = {
                "bytes": len(body),
                "parts_at_least": len(instances),
                "pixels_at_least": pixels,
                "refused_by": "MAX_STOW_PIXELS",
            }
            raise StowTooLargeError(
                f"the instances hold more than {settings.MAX_STOW_PIXELS} decoded pixels "
                "together (MAX_STOW_PIXELS); send them in several requests"
            )
    return instances


def _results_of(part: Part, predictor: Predictor, dicom: DicomResults) -> list[bytes]:
    """On a worker thread: the instance's SEG and SR, from one analysis of every frame (the
    results are the key frame's, not whichever came first), header included."""
    image = ImageRequest(data=part.data, declared_format="dicom", frame=ALL_FRAMES)
    return [to_bytes(ds) for ds in dicom.diagnosis(predictor.diagnose(image))]


class _Stow:
    """The work of one STOW-RS request: analyse each instance in turn on a worker thread, and
    hand each one's results to the delivery lane as soon as they are made."""

    def __init__(
        self,
        instances: list[_Instance],
        study: str | None,
        predictor: Predictor,
        dicom: DicomResults,
        delivery: ResultsDelivery | None,
        metrics: ServiceMetrics,
    ) -> None:
        self.instances = instances
        self.study = study
        self.predictor = predictor
        self.dicom = dicom
        self.delivery = delivery
        self.metrics = metrics
        self.started = False  # an instance was analysed: no more whole-request refusals
        self.refusal: domain.BusiError | None = None  # why the whole request is refused
        self.unexpected = 0  # instances failed by a bug (ours)

    async def run(self) -> None:
        """Analyse and deliver; sets `refusal` (and stops) when the service cannot take the
        request at all: raised inside a task group, it would reach the client as a 500."""
        async with anyio.create_task_group() as deliveries:
            for instance in self.instances:
                await self._analyse(instance)
                if self.refusal is not None:
                    return
                if instance.reason is None and self.delivery is not None:
                    deliveries.start_soon(self._deliver, instance)
                else:
                    instance.results = None  # no target: made, and dropped
                    instance.done = True

    async def _analyse(self, instance: _Instance) -> None:
        if instance.part.media_type != DICOM_MEDIA_TYPE or not instance.readable:
            instance.reason = CANNOT_UNDERSTAND
            return
        if self.study is not None and instance.study != self.study:
            instance.reason = DATASET_DOES_NOT_MATCH  # PS3.18 10.5.3: not the URL's study
            return
        try:
            instance.results = await anyio.to_thread.run_sync(
                _results_of, instance.part, self.predictor, self.dicom
            )
        except _CAPACITY_ERRORS as exc:
            if not self.started:  # nothing analysed yet: 503 / 504 for it all, to retry it all
                self.refusal = exc
                return
            instance.reason = _failure_reason(exc)
        except domain.BusiError as exc:
            instance.reason = _failure_reason(exc)
        except Exception as exc:  # a bug in analysing or in making the results: this one fails
            self.unexpected += 1
            if self.unexpected == 1:  # the first one's traceback; the summary counts them all
                log.error(
                    "STOW-RS instance not analysed: unexpected error",
                    extra={"error_type": type(exc).__name__},
                    exc_info=True,
                )
            instance.reason = PROCESSING_FAILURE
        else:
            self.started = True

    async def _deliver(self, instance: _Instance) -> None:
        """In the request's task group: whatever happens here fails this instance only (an
        exception let out would cancel the others and reach the sender as a 500)."""
        assert self.delivery is not None and instance.results is not None
        try:
            delivery = await self.delivery.deliver(instance.results)
            outcome = "delivered" if delivery.delivered else "failed"
            self.metrics.results_deliveries.labels(outcome).inc()
            if not delivery.delivered:
                instance.reason = PROCESSING_FAILURE
                instance.delivery_failure = delivery.reason
        except Exception as exc:
            log.error("STOW-RS delivery failed", extra={"error_type": type(exc).__name__})
            instance.reason = PROCESSING_FAILURE
            instance.delivery_failure = type(exc).__name__
        instance.results = None  # delivered or not, they are not kept
        instance.done = True


async def _cancel_on_disconnect(request: Request, work: anyio.CancelScope, gone: list) -> None:
    """Cancels `work` when the sender hangs up (the body is in: all that can come is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.append(True)
            work.cancel()
            return


def _summary(instances: list[_Instance], body_bytes: int) -> dict[str, Any]:
    """The request's one log line and audit record facts: counts and codes, no identifiers."""
    reasons = Counter(f"0x{i.reason:04X}" for i in instances if i.done and i.reason is not None)
    undelivered = Counter(i.delivery_failure for i in instances if i.delivery_failure)
    summary: dict[str, Any] = {
        "instances": len(instances),
        "stored": sum(i.done and i.reason is None for i in instances),
        "failed": sum(reasons.values()),
        "bytes": body_bytes,
    }
    if not all(i.done for i in instances):
        summary["not_processed"] = sum(not i.done for i in instances)
    if reasons:
        summary["failure_reasons"] = dict(reasons)
    if undelivered:
        summary["delivery_failures"] = dict(undelivered)
    return summary


async def _stow(
    request: Request,
    study: str | None,
    predictor: PredictorDep,
    dicom: DicomResultsDep,
    app_state: AppStateDep,
) -> JSONResponse:
    settings = app_state.settings
    delivery: ResultsDelivery | None = getattr(request.app.state, "delivery", None)
    if delivery is not None:
        delivery.check_capacity()  # before the body is even read
    boundary = _boundary(request)
    state = request.scope.setdefault("state", {})
    body = await request.body()
    instances = _received(body, boundary, settings, state)
    work = _Stow(instances, study, predictor, dicom, delivery, app_state.metrics)
    gone: list[bool] = []
    try:
        async with anyio.create_task_group() as watch:
            watch.start_soon(_cancel_on_disconnect, request, watch.cancel_scope, gone)
            await work.run()
            watch.cancel_scope.cancel()  # done: stop watching for a hang-up
    finally:
        summary = _summary(instances, len(body))
        state.setdefault("log", {}).update(summary)
        state["stow"] = {
            **summary,
            "received": [
                {
                    "sha256": sha256(i.part.data).hexdigest(),
                    "bytes": len(i.part.data),
                    "sop_instance_uid": audit_uid(i.sop_instance) or None,
                    "outcome": i.outcome,
                    "failure_reason": i.reason,
                }
                for i in instances
            ],
        }
    if gone:
        raise ClientDisconnect()  # nobody to answer; the log and audit say 499
    if work.refusal is not None:
        raise work.refusal
    answer = StowResponse()
    for instance in instances:
        outcome = "analysed" if instance.reason is None else "failed"
        app_state.metrics.dicomweb_instances.labels(outcome).inc()
        if instance.reason is None:
            answer.stored.append((instance.sop_class, instance.sop_instance))
        else:
            answer.failed.append((instance.sop_class, instance.sop_instance, instance.reason))
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
