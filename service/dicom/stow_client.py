"""The STOW-RS client: sends DICOM instances to one PACS (PS3.18 10.5), with retries and one
deadline per delivery. Its answer is a DICOM JSON dataset; a Failed SOP Sequence in it means the
target did not store them all."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from service.dicom.builders import DICOM_MEDIA_TYPE
from service.dicom.multipart import multipart_related

log = logging.getLogger(__name__)

DICOM_JSON_MEDIA_TYPE = "application/dicom+json"

# Status codes of a STOW-RS target worth another try: it may answer the next one.
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_S = 0.5
# A STOW-RS answer lists the stored and failed instances: a few KiB for our SEG and SR.
_MAX_ANSWER_BYTES = 1024 * 1024


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
