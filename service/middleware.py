"""Pure ASGI middleware: request ids, the request log, latency metric and audit record, and the
body limit and body timeout.

Pure ASGI (not BaseHTTPMiddleware) keeps the per-request overhead to a few function calls and
lets the body limit count the bytes of each `http.request` message before anything parses them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.audit import AuditLog, audit_record, should_audit
from service.errors import BodyTimeoutError, BodyTooLargeError, error_response, internal_error
from service.metrics import ServiceMetrics

log = logging.getLogger("service.access")
error_log = logging.getLogger("service.errors")

# A client's X-Request-ID is kept only when it looks generated: 32-64 hex digits, dashes allowed
# (a UUID, a W3C trace id), at least one of them a letter. An accession number (DICOM SH: at most
# 16 characters), a patient id or a name does not fit, so none can ride into the logs.
_SAFE_REQUEST_ID = re.compile(r"(?=[0-9-]*[a-fA-F])[0-9a-fA-F-]{32,64}")
_QUIET_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes

# On every answer: no MIME sniffing (an answer is only ever what its Content-Type says), no
# framing (clickjacking of the page).
_ALWAYS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
# Answers carry patient data (results, DICOM objects, errors naming an input): no cache, shared
# or private, may keep them. The static files of the page and the API documents carry none.
_NO_STORE = (b"cache-control", b"no-store")
_CACHEABLE_PREFIXES = ("/static/", "/docs-assets/")
# The page loads its own script, style and images (data: and blob: URLs it makes) and calls
# this origin only. Swagger UI (/docs) needs an inline script, so it gets only the framing rule.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_DOCS_CSP = "frame-ancestors 'none'; object-src 'none'; base-uri 'none'"


def security_headers(path: str, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` of an answer to `path`, with the security headers added (a header the
    answer set itself is kept)."""
    names = {name.lower() for name, _ in headers}
    added = [header for header in _ALWAYS if header[0] not in names]
    if b"cache-control" not in names and not path.startswith(_CACHEABLE_PREFIXES):
        added.append(_NO_STORE)
    content_type = next((v for n, v in headers if n.lower() == b"content-type"), b"")
    if b"content-security-policy" not in names and content_type.startswith(b"text/html"):
        csp = _DOCS_CSP if path.startswith("/docs") else PAGE_CSP
        added.append((b"content-security-policy", csp.encode("ascii")))
    return [*headers, *added]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _routes(routes: Any) -> Iterator[Any]:
    """The routes of a router, those of included routers flattened in (FastAPI keeps each
    include_router as one entry; ours use no prefix, so the routes' own paths are the full ones)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        else:
            yield route


def endpoint_label(scope: Scope, root_path: str = "") -> str:
    """The route template of the request, for logs and metrics; "unmatched" only for a path no
    route serves. Requests answered before routing (a 413 from Content-Length), with a method the
    path does not serve (405), or by routes that are not API routes (/docs, /openapi.json,
    /static/...) are matched here. `root_path`: the scope's before routing (a Mount changes it)."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    app = scope.get("app")
    for route in _routes(getattr(getattr(app, "router", None), "routes", ())):
        match, _ = route.matches({**scope, "type": "http", "root_path": root_path})
        if match is not Match.NONE:
            return f"{route.path}/*" if isinstance(route, Mount) else route.path
    return "unmatched"


def client_request_id(scope: Scope) -> str | None:
    """The client's X-Request-ID if it looks like a generated id (a UUID, a trace id), else
    None."""
    raw = _header(scope, b"x-request-id")
    if raw is None:
        return None
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return value if _SAFE_REQUEST_ID.fullmatch(value) else None


class RequestContextMiddleware:
    """Gives each request an id (echoed as X-Request-ID), times it, logs it, and turns an
    unhandled exception into the generic 500 envelope."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, audit: AuditLog | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        root_path = scope.get("root_path", "")
        request_id = client_request_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log"] = facts = {}
        status = 500
        response_started = False
        id_header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = security_headers(scope["path"], [*message.get("headers", ())])
                message = {**message, "headers": [*headers, id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away mid-upload: nobody is left to answer, and it is no server
            # error. 499 is nginx's "client closed request"; it only reaches the log and metrics.
            status = 499
            state["error_code"] = "client_disconnected"
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the shutdown grace period ends.
            if not response_started:
                status = 499
                state["error_code"] = "cancelled_at_shutdown"
            raise
        except Exception:
            error_log.exception("unhandled error", extra={"request_id": request_id})
            if response_started:
                raise
            await internal_error(scope)(scope, receive, send_with_id)
        finally:
            latency = time.perf_counter() - started
            endpoint = endpoint_label(scope, root_path)
            self.metrics.request_latency.labels(endpoint, str(status)).observe(latency)
            code = state.get("error_code")
            if code:
                self.metrics.failures.labels(code).inc()
            if status >= 500 and status != 503:
                level = logging.ERROR  # our own failure: a client's input never causes one
            elif endpoint in _QUIET_ENDPOINTS:
                level = logging.DEBUG
            elif status == 503:
                level = logging.WARNING  # not ready (yet): loading, or a refused model
            else:
                level = logging.INFO
            if log.isEnabledFor(level):
                fields = {
                    "request_id": request_id,
                    "method": scope["method"],
                    "endpoint": endpoint,
                    "status": status,
                    "latency_ms": round(latency * 1000, 2),
                    **facts,
                }
                if code:
                    fields["error_code"] = code
                log.log(level, "%s %s %d", scope["method"], endpoint, status, extra=fields)
            if self.audit is not None and should_audit(scope, status):
                self.audit.write(audit_record(scope, endpoint, status))


class BodySizeLimitMiddleware:
    """Answers 413 when a body is, or turns out to be, larger than `max_body_bytes`.

    A declared Content-Length is checked before any byte is read; a chunked (or lying) body is
    counted message by message, and reading stops with BodyTooLargeError at the first byte over
    the limit, which service.errors maps to the same 413.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        mib = max_body_bytes / (1024 * 1024)
        self.message = f"the request body is larger than the {mib:g} MiB limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            response = error_response(scope, 413, BodyTooLargeError.code, self.message)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.message)
            return message

        await self.app(scope, limited_receive, send)


class BodyTimeoutMiddleware:
    """Answers 408 (and closes the connection) when a request body takes longer than
    `timeout_s` to arrive, counted from when the request reached the app: a client that trickles
    its upload cannot hold a connection and a request slot for ever."""

    def __init__(self, app: ASGIApp, timeout_s: float, metrics: ServiceMetrics) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.message = f"the request body did not arrive within {timeout_s:g} s"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:  # the body is in: what is left to wait for is a disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                self.metrics.slow_client_timeouts.labels("body").inc()
                raise BodyTimeoutError(self.message) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)
