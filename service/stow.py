"""STOW-RS both ways: reading a multipart/related request, and sending results to a PACS.

PS3.18 10.5: a STOW-RS request is a `multipart/related; type="application/dicom"` body whose parts
are PS3.10 files, and its response is a DICOM JSON dataset listing the stored instances (Referenced
SOP Sequence) and the failed ones (Failed SOP Sequence, each with a Failure Reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message

import httpx

from service.dicom_results import DICOM_MEDIA_TYPE, multipart_related
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


class MalformedMultipartError(InputError):
    """A multipart/related body that cannot be split into its parts."""

    code = "malformed_multipart"


@dataclass(frozen=True)
class Part:
    media_type: str
    data: bytes


def media_type_params(value: str) -> tuple[str, dict[str, str]]:
    """`multipart/related; type="application/dicom"; boundary=x` -> (media type, parameters)."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """The parts of a PS3.18 8.6.1.2 / RFC 2046 multipart body, each part's bytes exact.

    Raises MalformedMultipartError when the boundary never appears or a part has no header end.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(b"\r\n" + delimiter)
    first = pieces[0]
    if first.startswith(delimiter):  # no preamble: the body starts with the first delimiter
        pieces[0] = first[len(delimiter) :]
    elif delimiter in first:  # a preamble before the first delimiter is ignored (RFC 2046)
        pieces[0] = first[first.index(delimiter) + len(delimiter) :]
    else:
        raise MalformedMultipartError("the body does not contain the multipart boundary")
    parts = []
    for piece in pieces:
        if piece.startswith(b"--"):  # the close delimiter: the epilogue after it is ignored
            break
        header_end = piece.find(b"\r\n\r\n")
        if header_end < 0:
            raise MalformedMultipartError("a multipart part has no end of headers")
        headers = piece[:header_end].decode("latin-1")
        media_type = ""
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                media_type = media_type_params(value.strip())[0]
        parts.append(Part(media_type, piece[header_end + 4 :]))
    if not parts:
        raise MalformedMultipartError("the multipart body holds no part")
    return parts


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
    reason: str = ""  # why it failed: an HTTP status or a transport error class; no payload


class StowClient:
    """Sends DICOM instances to one STOW-RS URL, with basic or bearer auth and bounded retries."""

    def __init__(
        self,
        url: str,
        *,
        username: str = "",
        password: str = "",
        token: str = "",
        attempts: int = 3,
        timeout_s: float = 15.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.attempts = attempts
        headers = {"Accept": DICOM_JSON_MEDIA_TYPE}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        auth = httpx.BasicAuth(username, password) if username and not token else None
        self._client = httpx.Client(
            headers=headers, auth=auth, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._client.close()

    def store(self, instances: Sequence[bytes]) -> Delivery:
        """POST the instances in one STOW-RS request; retry transport errors and 408 / 429 /
        5xx answers up to `attempts` tries in all, backing off 0.5 s, 1 s, 2 s ... between.

        Delivered means the target answered 200, or 202 without a Failed SOP Sequence.
        """
        body, content_type = multipart_related(instances, DICOM_MEDIA_TYPE)
        reason = ""
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 2))
            try:
                response = self._client.post(
                    self.url, content=body, headers={"Content-Type": content_type}
                )
            except httpx.TransportError as exc:
                reason = type(exc).__name__
                log.warning("results delivery try %d failed: %s", attempt, reason)
                continue
            if response.status_code == 200 or (
                response.status_code == 202 and not _has_failures(response)
            ):
                return Delivery(True, attempt)
            reason = f"HTTP {response.status_code}"
            log.warning("results delivery try %d refused: %s", attempt, reason)
            if response.status_code not in _RETRYABLE_STATUS:
                break
        return Delivery(False, attempt, reason)


def _has_failures(response: httpx.Response) -> bool:
    try:
        return "00081198" in response.json()
    except ValueError:
        return False
