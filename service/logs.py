"""Structured logging: one JSON object per line, built from an allow-list of fields.

Patient data stays out by construction, not by care at each call:

* a record's `extra=` fields reach the line only when their name is in LOG_FIELDS (ids, sizes,
  hashes, versions, codes, counts); any other is dropped, and its name noted in `withheld`;
* an exception is written as its traceback (code lines, files, line numbers) and its type, with
  the message replaced by the error code of a domain error or by `<withheld>`: the message of a
  pydicom ValueError quotes the tag value it choked on, a multi-valued birth date included;
* what third-party code says is not ours to choose: pydicom's warnings quote the values of the
  tags they complain about (`Invalid value for VR IS: '<value>'`), and a value can be a
  patient's name. So every record that does not come from this project, warnings included, has
  its quoted values and bracketed lists withheld before it is written (`redact`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
# Loggers whose messages this project writes itself (and keeps free of patient data).
_OWN_LOGGERS = ("service", "shared", "training", "uvicorn")

# A quoted value: '...', "..." (also as bytes, b'...'). A two-letter upper-case token is a VR
# name ('UN', 'IS'), which says what kind of value was wrong and nothing about the patient.
# A bracketed list ([19700101, 19800101], a MultiValue's repr) is withheld whole.
_QUOTED = re.compile(r"""'(?![A-Z]{2}')[^'\n]*'|"(?![A-Z]{2}")[^"\n]*"|\[[^\]\n]*\]""")
WITHHELD = "'<withheld>'"

# The `extra=` fields a log line may carry: what our own code passes, none of it patient data.
LOG_FIELDS = frozenset({
    # a request (service.middleware, service.deps, service.predictors, service.auth)
    "request_id", "method", "endpoint", "status", "latency_ms", "error_code", "key_id", "keys",
    "bytes", "sha256", "format", "n_frames", "models", "shape", "frame", "frames_analysed",
    # the trace a line belongs to (service.tracing)
    "trace_id", "span_id",
    # a STOW-RS request's summary (service.dicom.stow)
    "instances", "stored", "failed", "not_processed", "failure_reasons", "delivery_failures",
    # models, artifacts, promotion, training (service.registry, shared, training)
    "task", "version", "reason", "promoted", "previous", "newest", "model_dir", "stage",
    "error_type", "action", "folder", "preset", "cross_validation",
    # warnings (service.logs)
    "category", "origin",
})  # fmt: skip

warnings_log = logging.getLogger("py.warnings")


def redact(text: str) -> str:
    """`text` with every quoted value replaced by '<withheld>' (VR names are kept)."""
    return _QUOTED.sub(WITHHELD, text)


def _chain(te: traceback.TracebackException) -> Iterator[traceback.TracebackException]:
    """`te` and every exception it was raised from, during, or groups."""
    seen: set[int] = set()
    pending = [te]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        pending += list(getattr(current, "exceptions", None) or ())


def format_exception(exc_info: tuple[Any, Any, Any]) -> str:
    """The traceback of `exc_info`, each exception's message replaced by its domain error code
    (`[corrupt_image]`) or `<withheld>`: code lines, files and types only."""
    te = traceback.TracebackException(*exc_info, compact=True)
    for current in _chain(te):
        code = getattr(current.exc_type, "code", None)
        current._str = f"[{code}]" if isinstance(code, str) else "<withheld>"  # type: ignore[attr-defined]
        current.__notes__ = None
        for attribute in ("text", "filename", "msg"):  # a SyntaxError's quoted source
            if getattr(current, attribute, None) is not None:
                setattr(current, attribute, None)
    return "".join(te.format()).rstrip("\n")


class RedactForeignValues(logging.Filter):
    """Withholds the quoted values in records of loggers that are not this project's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_OWN_LOGGERS):
            record.msg = redact(record.getMessage())
            record.args = ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        withheld = []
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key == "color_message":
                continue
            if key in LOG_FIELDS:
                entry[key] = value
            else:
                withheld.append(key)
        if withheld:
            entry["withheld"] = sorted(withheld)
        if record.exc_info:
            entry["exception"] = format_exception(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return format_exception(ei)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning: a log record (redacted like any foreign one) instead of stderr text.

    The source line that Python would print is left out: it is code, and it says nothing more.
    """
    warnings_log.warning(
        "%s", str(message), extra={"category": category.__name__, "origin": f"{filename}:{lineno}"}
    )


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("service").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        logging.getLogger("service").critical(
            "uncaught exception in thread %s",
            getattr(args.thread, "name", "?"),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )


def configure_logging(level: str, fmt: str) -> None:
    """Route every logger (uvicorn's included), every warning and every uncaught exception to
    one stderr handler in the chosen format, foreign values withheld."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactForeignValues())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    warnings.showwarning = _show_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
