"""STOW-RS ingest (PS3.18 10.5): what POST /dicomweb/studies[/{study}] does with what a PACS sends.

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

Deliveries run on their own lane (service.dicom.delivery): async I/O with one deadline each,
started as soon as an instance's results are made, so a slow PACS holds no inference thread. A
sender that hangs up cancels the rest: no further instance is analysed, no further delivery is
sent.

The response is a DICOM JSON dataset listing the stored instances (Referenced SOP Sequence) and
the failed ones (Failed SOP Sequence, each with a Failure Reason).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service.audit import audit_uid
from service.dicom.builders import DICOM_MEDIA_TYPE, to_bytes
from service.dicom.delivery import ResultsDelivery
from service.dicom.multipart import MalformedMultipartError, Part, iter_multipart
from service.dicom.results import DicomResults
from service.errors import BodyTooLargeError, UnsupportedMediaTypeError
from service.media_types import parse_media_type
from service.metrics import ServiceMetrics
from service.predictors import ALL_FRAMES, ImageRequest, Predictor, TooManyFramesError
from service.settings import Settings
from shared import errors as domain
from shared.decoding import read_dicom_header

log = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-3 and PS3.4 Annex B.2.3: Failure Reason (0008,1197) values.
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass
class StowResponse:
    """What a STOW-RS origin server answers, accumulated instance by instance."""

    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # ... and Failure Reason

    @property
    def status_code(self) -> int:
        """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_json(self) -> dict:
        """The DICOM JSON (PS3.18 F.2) response dataset."""
        body: dict = {}
        if self.stored:
            body["00081199"] = {
                "vr": "SQ",
                "Value": [_sop_reference(c, i) for c, i in self.stored],
            }
        if self.failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {**_sop_reference(c, i), "00081197": {"vr": "US", "Value": [reason]}}
                    for c, i, reason in self.failed
                ],
            }
        return body


def _sop_reference(sop_class: str, sop_instance: str) -> dict:
    def ui(value: str) -> dict:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}

    return {"00081150": ui(sop_class), "00081155": ui(sop_instance)}


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


def stow_boundary(content_type: str | None) -> str:
    """The boundary of a STOW-RS request's Content-Type. Raises UnsupportedMediaTypeError (415)
    for anything but multipart/related of application/dicom parts, MalformedMultipartError (400)
    when it names no boundary."""
    media_type = parse_media_type(content_type)
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


class _StowRequest:
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


async def _cancel_on_disconnect(receive: Receive, work: anyio.CancelScope, gone: list) -> None:
    """Cancels `work` when the sender hangs up (the body is in: all that can come is that)."""
    while True:
        message = await receive()
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


@dataclass(frozen=True)
class StowIngest:
    """STOW-RS ingest with what it needs of the app: the predictor, the results builder, the
    delivery lane (None: no RESULTS_STOW_URL), the metrics and the caps in the settings."""

    predictor: Predictor
    dicom: DicomResults
    delivery: ResultsDelivery | None
    metrics: ServiceMetrics
    settings: Settings

    async def store(
        self,
        body: bytes,
        boundary: str,
        study: str | None,
        facts: dict[str, Any],
        receive: Receive,
    ) -> StowResponse:
        """Analyse each instance of the multipart `body` (of `study` only, when given), deliver
        its results, and say what became of each. `facts` is the request's state, which gets the
        log line's counts and the audit record's `stow`; `receive` tells of a hang-up.

        Raises StowTooLargeError (413) past the caps, the capacity error (503 / 504) when the
        service cannot take the request before any instance was analysed, MalformedMultipartError
        for a body that cannot be split, and ClientDisconnect when the sender hung up.
        """
        instances = _received(body, boundary, self.settings, facts)
        work = _StowRequest(
            instances, study, self.predictor, self.dicom, self.delivery, self.metrics
        )
        gone: list[bool] = []
        try:
            async with anyio.create_task_group() as watch:
                watch.start_soon(_cancel_on_disconnect, receive, watch.cancel_scope, gone)
                await work.run()
                watch.cancel_scope.cancel()  # done: stop watching for a hang-up
        finally:
            summary = _summary(instances, len(body))
            facts.setdefault("log", {}).update(summary)
            facts["stow"] = {
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
            self.metrics.dicomweb_instances.labels(outcome).inc()
            if instance.reason is None:
                answer.stored.append((instance.sop_class, instance.sop_instance))
            else:
                answer.failed.append((instance.sop_class, instance.sop_instance, instance.reason))
        return answer
