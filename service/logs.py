"""Structured logging: one JSON object per line, with the `extra=` fields of each record.

Our own callers pass only safe fields (ids, sizes, hashes, versions, codes). What third-party code
says is not ours to choose: pydicom's warnings quote the values of the tags they complain about
(`Invalid value for VR IS: '<value>'`, `Unknown encoding '<value>'`), and a value can be a
patient's name or an accession number. So every record that does not come from this project,
warnings included, has its quoted values withheld before it is written (`redact`), and so does
the message line of every exception.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import warnings
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
# Loggers whose messages this project writes itself (and keeps free of patient data).
_OWN_LOGGERS = ("service", "shared", "training", "uvicorn")

# A quoted value: '...', "..." (also as bytes, b'...'). A two-letter upper-case token is a VR
# name ('UN', 'IS'), which says what kind of value was wrong and nothing about the patient.
_QUOTED = re.compile(r"""'(?![A-Z]{2}')[^'\n]*'|"(?![A-Z]{2}")[^"\n]*\"""")
WITHHELD = "'<withheld>'"

warnings_log = logging.getLogger("py.warnings")


def redact(text: str) -> str:
    """`text` with every quoted value replaced by '<withheld>' (VR names are kept)."""
    return _QUOTED.sub(WITHHELD, text)


def _redact_exception(text: str) -> str:
    # Code lines of a traceback are indented; the `Type: message` lines are not, and only they
    # can quote input.
    return "\n".join(line if line.startswith(" ") else redact(line) for line in text.split("\n"))


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
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key != "color_message":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = _redact_exception(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return _redact_exception(super().formatException(ei))


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
