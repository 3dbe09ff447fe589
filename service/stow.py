"""STOW-RS both ways: reading a multipart/related request, and sending results to a PACS.

PS3.18 10.5: a STOW-RS request is a `multipart/related; type="application/dicom"` body whose parts
are PS3.10 files, and its response is a DICOM JSON dataset listing the stored instances (Referenced
SOP Sequence) and the failed ones (Failed SOP Sequence, each with a Failure Reason).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx

from service.dicom_results import DICOM_MEDIA_TYPE, multipart_related
from service.media_types import parse_media_type
from shared.errors import InputError

log = logging.getLogger(__name__)

DICOM_JSON_MEDIA_TYPE = "application/dicom+json"

# PS3.18 Table 10.5.3-3 and PS3.4 Annex B.2.3: Failure Reason (0008,1197) values.
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

# Status codes of a STOW-RS target worth another try: it may answer the next one.
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_S = 0.5
# A STOW-RS answer lists the stored and failed instances: a few KiB for our SEG and SR.
_MAX_ANSWER_BYTES = 1024 * 1024


class MalformedMultipartError(InputError):
    """A multipart/related body that cannot be split into its parts."""

    code = "malformed_multipart"


@dataclass(frozen=True)
class Part:
    media_type: str
    data: bytes


def iter_multipart(body: bytes, boundary: str) -> Iterator[Part]:
    """The parts of a PS3.18 8.6.1.2 / RFC 2046 multipart body, each part's bytes exact, one at a
    time: a caller that counts them can stop at a cap before the rest of the body is split.

    Raises MalformedMultipartError when the boundary never appears or a part has no header end.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    separator = b"\r\n" + delimiter
    first_end = body.find(separator)
    first = body if first_end < 0 else body[:first_end]
    if first.startswith(delimiter):  # no preamble: the body starts with the first delimiter
        position = len(delimiter)
    elif delimiter in first:  # a preamble before the first delimiter is ignored (RFC 2046)
        position = first.index(delimiter) + len(delimiter)
    else:
        raise MalformedMultipartError("the body does not contain the multipart boundary")
    found = False
    while True:
        end = body.find(separator, position)
        if body.startswith(b"--", position):  # the close delimiter: the epilogue is ignored
            break
        piece = body[position : len(body) if end < 0 else end]
        header_end = piece.find(b"\r\n\r\n")
        if header_end < 0:
            raise MalformedMultipartError("a multipart part has no end of headers")
        media_type = ""
        for line in piece[:header_end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                media_type = parse_media_type(value).essence
        found = True
        yield Part(media_type, piece[header_end + 4 :])
        if end < 0:
            break
        position = end + len(separator)
    if not found:
        raise MalformedMultipartError("the multipart body holds no part")


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """Every part of a multipart body (iter_multipart); raises as it does."""
    return list(iter_multipart(body, boundary))


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


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    reason: str = ""  # why it failed: an HTTP status, a transport error class, "deadline"


class StowClient:
    """Sends DICOM instances to one STOW-RS URL, with basic or bearer auth, bounded retries and
    one overall deadline per delivery.

    Async I/O (httpx.AsyncClient): a delivery waiting on a slow target holds no thread. The
    deadline covers the whole delivery, connect, upload, answer, every retry and its backoff
    together, so a target that trickles its answer a byte at a time cannot stretch a try past it
    (a per-read timeout would let it, for ever). Cancelling the awaiting task (the sender hung up)
    closes the connection at once.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str = "",
        password: str = "",
        token: str = "",
        attempts: int = 3,
        try_timeout_s: float = 15.0,
        deadline_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.attempts = attempts
        self.try_timeout_s = try_timeout_s
        self.deadline_s = deadline_s
        headers = {"Accept": DICOM_JSON_MEDIA_TYPE}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        auth = httpx.BasicAuth(username, password) if username and not token else None
        self._client = httpx.AsyncClient(
            headers=headers,
            auth=auth,
            # per operation; the try and the delivery have their own wall-clock deadlines below
            timeout=httpx.Timeout(min(try_timeout_s, deadline_s)),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def store(self, instances: Sequence[bytes], deadline: float | None = None) -> Delivery:
        """POST the instances in one STOW-RS request; retry transport errors and 408 / 429 /
        5xx answers up to `attempts` tries in all, backing off 0.5 s, 1 s, 2 s ... between, all
        before `deadline` (the event loop's clock; default: `deadline_s` from now); each try
        within `try_timeout_s` (wall clock, not per read).

        Delivered means the target answered 200, or 202 without a Failed SOP Sequence.
        """
        body, content_type = multipart_related(instances, DICOM_MEDIA_TYPE)
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.deadline_s
        reason = ""
        made = 0  # tries made
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                backoff = _BACKOFF_S * 2 ** (attempt - 2)
                if loop.time() + backoff >= deadline:
                    break  # no time left for another try
                await asyncio.sleep(backoff)
            made = attempt
            try_deadline = min(deadline, loop.time() + self.try_timeout_s)
            try:
                async with asyncio.timeout_at(try_deadline):
                    status, answer = await self._post(body, content_type)
            except TimeoutError:
                reason = "deadline" if try_deadline >= deadline else "try_timeout"
                log.debug("results delivery try %d: %s", attempt, reason)
                if reason == "deadline":
                    break
                continue
            except httpx.TransportError as exc:
                reason = type(exc).__name__
                log.debug("results delivery try %d failed: %s", attempt, reason)
                continue
            if status == 200 or (status == 202 and not _has_failures(answer)):
                return Delivery(True, attempt)
            reason = f"HTTP {status}"
            log.debug("results delivery try %d refused: %s", attempt, reason)
            if status not in _RETRYABLE_STATUS:
                break
        return Delivery(False, made, reason)

    async def _post(self, body: bytes, content_type: str) -> tuple[int, bytes]:
        """(status, the first _MAX_ANSWER_BYTES of the answer): a target cannot make the
        service hold an answer of any size."""
        answer = bytearray()
        async with self._client.stream(
            "POST", self.url, content=body, headers={"Content-Type": content_type}
        ) as response:
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) > _MAX_ANSWER_BYTES:
                    break
        return response.status_code, bytes(answer[:_MAX_ANSWER_BYTES])


def _has_failures(answer: bytes) -> bool:
    try:
        return "00081198" in json.loads(answer)
    except (ValueError, TypeError):
        return False
