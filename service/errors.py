"""The one place that turns errors into HTTP responses.

Every error body is the envelope {"error": {"code", "message", "request_id"}}. Domain errors
(shared.errors) keep their code and safe message; everything else gets a generic message, so no
stack trace, path or internal name ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth import InsufficientScopeError, NotAuthenticatedError
from service.dicom.builders import DicomOutputNeedsDicomInputError, UnreferenceableDicomError
from service.dicom.multipart import MalformedMultipartError
from shared import errors as domain

log = logging.getLogger(__name__)


class BodyTooLargeError(domain.InputError):
    """The request body is larger than MAX_BODY_BYTES."""

    code = "body_too_large"


class UnsupportedMediaTypeError(domain.InputError):
    """The request's Content-Type is not one the image endpoints accept."""

    code = "unsupported_media_type"


class MissingFileError(domain.InputError):
    """A multipart request without a `file` part."""

    code = "missing_file"


class BodyTimeoutError(domain.InputError):
    """The request body did not arrive within BODY_TIMEOUT_S (a slow or stalled client)."""

    code = "request_timeout"
    headers = {"Connection": "close"}  # the rest of the body is not waited for


# Looked up along the exception's MRO, so a subclass inherits its parent's status.
STATUS_BY_ERROR: dict[type[domain.BusiError], int] = {
    domain.BusiError: 500,
    domain.InputError: 400,
    domain.EmptyInputError: 400,
    MissingFileError: 400,
    domain.CorruptImageError: 400,
    BodyTooLargeError: 413,
    BodyTimeoutError: 408,
    NotAuthenticatedError: 401,
    InsufficientScopeError: 403,
    domain.UnsupportedFormatError: 415,
    domain.FormatMismatchError: 415,
    UnsupportedMediaTypeError: 415,
    DicomOutputNeedsDicomInputError: 406,
    UnreferenceableDicomError: 422,
    MalformedMultipartError: 400,
    domain.ImageTooLargeError: 422,
    domain.ImageTooSmallError: 422,
    domain.NoPixelDataError: 422,
    domain.UnsupportedDicomError: 422,
    domain.InvalidDicomValueError: 422,
    domain.FrameOutOfRangeError: 422,
    domain.NotUltrasoundError: 422,
    domain.NonImageDicomError: 422,
    domain.ArtifactError: 503,
    domain.ModelUnavailableError: 503,
    domain.ServiceOverloadedError: 503,
    domain.DeadlineExceededError: 504,
}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 406: "not_acceptable"}

_HTTP_MESSAGES = {
    404: "no such endpoint",
    405: "method not allowed on this endpoint",
    406: "cannot produce the requested media type",
}

# Codes no exception class above carries: request validation, the HTTP router, a bug, and the
# slow-client guard of service.connections (which answers before any request exists).
OTHER_CODES = (
    "invalid_request",
    "bad_request",
    "internal_error",
    "header_timeout",
    "header_too_large",
)


def error_codes() -> list[str]:
    """Every `code` an error envelope can carry, for the OpenAPI enum: those of the domain and
    service errors (any subclass, wherever in shared/ or service/ it is defined) and the others."""
    classes: list[type[domain.BusiError]] = []
    pending: list[type[domain.BusiError]] = [domain.BusiError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending += cls.__subclasses__()
    ours = [c for c in classes if c.__module__.startswith(("shared.", "service."))]
    return sorted({c.code for c in ours} | set(_HTTP_CODES.values()) | set(OTHER_CODES))


def status_for(exc: domain.BusiError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_response(
    scope: MutableMapping[str, Any],
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error envelope; also notes the code in the request state for the log and metrics."""
    state = scope.setdefault("state", {})
    state["error_code"] = code
    body = {"error": {"code": code, "message": message, "request_id": state.get("request_id")}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, domain.BusiError)
    status = status_for(exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 503:
        headers["Retry-After"] = "5"
    return error_response(request.scope, status, exc.code, exc.message, headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Name the offending parameters, never echo their values.
    fields = sorted({".".join(str(p) for p in err.get("loc", ())) for err in exc.errors()})
    return error_response(
        request.scope, 422, "invalid_request", f"invalid request parameters: {', '.join(fields)}"
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "error")
    message = _HTTP_MESSAGES.get(exc.status_code, "the request could not be processed")
    return error_response(request.scope, exc.status_code, code, message, exc.headers)


def internal_error(scope: MutableMapping[str, Any]) -> JSONResponse:
    """The response to a bug: a generic message, the details only in the log."""
    return error_response(scope, 500, "internal_error", "internal error; see the service log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(domain.BusiError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
