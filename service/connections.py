"""Slow clients at the connection level, where no ASGI middleware can see them.

uvicorn times out only idle keep-alive connections: a connection that opens and sends nothing, or
sends its headers a byte at a time (slowloris), is held for ever, and with httptools the headers
may grow without limit. The app sees a request only once its headers are complete, so the guard
has to sit in the HTTP protocol: `guarded_protocol` is uvicorn's httptools protocol plus

* a header timeout: a request's headers (from the connection's start, or from the first byte of
  a later request on it) must be complete within HEADER_TIMEOUT_S, else 408 and the connection
  closes;
* a header size cap (MAX_HEADER_BYTES), else 431 and the connection closes.

The body has its own timeout in the app (middleware.BodyTimeoutMiddleware), and uvicorn's
`limit_concurrency` (MAX_CONNECTIONS) caps the connections and requests a replica holds at once.
Beyond that cap uvicorn answers a plain-text 503 without calling the app; the protocol answers
the service's JSON envelope instead (code `overloaded`, with Retry-After, as a full queue does).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

CAPACITY_RETRY_AFTER_S = 1

MAX_HEADER_BYTES = 64 * 1024


def _response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "request_id": None}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\n"
        "cache-control: no-store\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _at_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app of a request past MAX_CONNECTIONS: 503 in the service's error envelope."""
    body = json.dumps({
        "error": {
            "code": "overloaded",
            "message": "The service holds as many connections as it may (MAX_CONNECTIONS); "
            "retry after the time in the Retry-After header.",
            "request_id": None,
        }
    }).encode()  # fmt: skip
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(CAPACITY_RETRY_AFTER_S).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def guarded_protocol(
    header_timeout_s: float,
    on_refused: Callable[[str], None] = lambda phase: None,
    on_capacity: Callable[[], None] = lambda: None,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header timeout, a header size cap and a JSON 503.

    `on_refused(phase)` is called for each connection refused ("headers" or "header_size"),
    `on_capacity()` for each request answered 503 because MAX_CONNECTIONS were held.
    """
    timed_out = _response(
        408,
        "Request Timeout",
        "header_timeout",
        f"the request headers did not arrive within {header_timeout_s:g} s",
    )
    too_large = _response(
        431,
        "Request Header Fields Too Large",
        "header_too_large",
        f"the request headers are larger than {MAX_HEADER_BYTES // 1024} KiB",
    )

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _in_headers = False
        _tail = b""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # A read may hold the end of the headers and much of the body: count only the
            # bytes up to the blank line that ends the headers (it may straddle two reads).
            if self._in_headers:
                window = self._tail + data
                end = window.find(b"\r\n\r\n")
                self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._tail = window[-3:]
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._refuse(too_large, "header_size")
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # a later request on the connection: its own clock
                self._await_headers()

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # uvicorn hands a request past limit_concurrency to its plain-text 503 app (here,
            # or later for a pipelined request): answer in the service's envelope instead.
            if app is service_unavailable:
                on_capacity()
                app = _at_capacity
            super()._start_asgi_task(cycle, app)

        def _await_headers(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._in_headers = True
            self._header_bytes = 0
            self._tail = b""
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_done(self) -> None:
            self._in_headers = False
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            self._refuse(timed_out, "headers")

        def _refuse(self, response: bytes, phase: str) -> None:
            self._headers_done()
            if self.transport.is_closing():
                return
            on_refused(phase)
            self.transport.write(response)
            self.transport.close()

    return GuardedHttpToolsProtocol
