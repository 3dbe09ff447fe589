"""The audit log: who asked what, on which input, and what the service answered.

It is kept apart from the application log because it holds what that log must not: the source
DICOM UIDs (Study, Series, SOP Instance), which tie a request to a patient's study. So it is its
own file (AUDIT_LOG_FILE), created 0600, one JSON object per line:

    {"time", "request_id", "key_id", "client", "method", "endpoint", "status", "error_code",
     "inputs": [{"sha256", "bytes", "format", "source", "models", "result"}],
     "stow": {"instances", "stored", "failed", "bytes", "failure_reasons",
              "received": [{"sha256", "bytes", "sop_instance_uid", "outcome", "failure_reason"}]}}

(a STOW-RS request refused for its size: "stow": {"bytes", "parts_at_least", "refused_by"}.)

`key_id` names the key, never the key. `inputs` has one entry per analysed image (several for a
STOW-RS request); `stow`, on a STOW-RS request, lists every part received, analysed or not (a
request refused for its size says how many parts and bytes it held, at least). `client` is the
TCP peer's address, or the X-Forwarded-For one only from a proxy in FORWARDED_ALLOW_IPS. A UID
field holds a UID or `<not a UID>`, never another value. Every request to an `infer` endpoint
is recorded, and every refused key.

The inputs and results are gathered by `RecordingPredictor`, which the routes receive in place of
the predictor (service.deps): it sees each image and each result without the routes or the
response layer knowing. It also counts the served labels and top probabilities per model version
(drift), audit log or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.auth import AccessConfigError
from service.metrics import ServiceMetrics
from shared import errors as domain
from shared.decoding import read_dicom_header, sniff_format

log = logging.getLogger(__name__)

_UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# PS3.5 9.1: a UID is digits and dots, at most 64 characters. A value that is not one (a name or
# an accession number in the wrong field) is no identifier the audit log may keep.
_UID = re.compile(r"[0-9.]{1,64}")


class AuditLog:
    """Appends JSON lines to one file, created 0600. Thread-safe.

    The service never deletes or truncates audit records; rotation is the host's (logrotate,
    a log shipper): when the file is renamed or removed, the next record reopens AUDIT_LOG_FILE,
    creating a new 0600 file, so no record goes to a file nobody reads any more.
    """

    def __init__(self, path: Path, metrics: ServiceMetrics | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self._lock = threading.Lock()
        try:
            self._fd = self._open()
        except OSError as exc:
            raise AccessConfigError(
                f"AUDIT_LOG_FILE {path} cannot be opened: {exc.strerror}"
            ) from None

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # os.open's mode only applies to a new file (and through the umask): make an existing
        # one private too.
        os.fchmod(fd, 0o600)
        return fd

    def _reopen_if_rotated(self) -> None:
        """Under the lock: reopen the path when it no longer names the open file."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(self._fd)
        if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            fd = self._open()
            os.close(self._fd)
            self._fd = fd
            log.info("audit log reopened (the file was rotated)")

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._lock:
                self._reopen_if_rotated()
                os.write(self._fd, line)
        except OSError as exc:
            log.error("audit record not written: %s", exc.strerror)
            if self.metrics is not None:
                self.metrics.audit_failures.inc()

    def close(self) -> None:
        os.close(self._fd)


def audit_record(scope: dict[str, Any], endpoint: str, status: int) -> dict[str, Any]:
    state = scope.get("state", {})
    client = scope.get("client")
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": state.get("request_id"),
        "key_id": state.get("key_id"),
        "client": client[0] if client else None,
        "method": scope.get("method"),
        "endpoint": endpoint,
        "status": status,
        "error_code": state.get("error_code"),
        "inputs": state.get("audit_inputs", []),
        **({"stow": state["stow"]} if "stow" in state else {}),
    }


def should_audit(scope: dict[str, Any], status: int) -> bool:
    """Every request to an `infer` endpoint, and every refused key anywhere."""
    state = scope.get("state", {})
    return state.get("scope") == "infer" or status in (401, 403)


def dicom_source(data: bytes) -> dict[str, str] | None:
    """The source UIDs of a DICOM file, or None when its header cannot be read."""
    ds = read_dicom_header(data, _UID_TAGS)
    try:
        return None if ds is None else {tag: audit_uid(ds.get(tag, "")) for tag in _UID_TAGS}
    except Exception:  # a value pydicom cannot convert: the audit record says so with None
        return None


def audit_uid(value: object) -> str:
    """`value` if it is a UID, else "<not a UID>" ("" stays "")."""
    text = str(value)
    return text if _UID.fullmatch(text) else ("" if not text else "<not a UID>")


def _find(result: Any, attribute: str) -> list[Any]:
    """The objects in `result` (a result, a tuple of them, or one holding them) that have
    `attribute`: duck-typed, so the recorder follows the predictor's result types."""
    if result is None:
        return []
    if isinstance(result, tuple | list):
        return [found for item in result for found in _find(item, attribute)]
    if hasattr(result, attribute):
        return [result]
    found = []
    for name in ("classification", "segmentation"):
        found += _find(getattr(result, name, None), attribute)
    return found


def _model_key(model: Any) -> tuple[str, str]:
    return str(getattr(model, "task", "")), str(getattr(model, "version", ""))


class RecordingPredictor:
    """The predictor, as the routes see it: each image and result is noted for the audit log and
    each served classification counted per model version. Anything else passes through."""

    _RECORDED = frozenset({"classify", "segment", "diagnose"})

    def __init__(
        self, predictor: Any, metrics: ServiceMetrics, state: dict[str, Any] | None
    ) -> None:
        self._predictor = predictor
        self._metrics = metrics
        self._inputs: list[dict[str, Any]] | None = None
        if state is not None:  # an audit log is kept
            self._inputs = state.setdefault("audit_inputs", [])

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._predictor, name)
        if name not in self._RECORDED:
            return attribute

        def recorded(request: Any, *args: Any, **kwargs: Any) -> Any:
            entry = self._input_entry(request)
            try:
                result = attribute(request, *args, **kwargs)
            except domain.BusiError as exc:
                if entry is not None:
                    entry["result"] = {"error": exc.code}
                raise
            finally:
                if entry is not None:
                    entry["models"] = dict(getattr(request, "facts", {}).get("models") or {})
            self._observe(result, entry)
            return result

        return recorded

    def _input_entry(self, request: Any) -> dict[str, Any] | None:
        if self._inputs is None:
            return None
        data: bytes = getattr(request, "data", b"")
        fmt = sniff_format(data)
        entry: dict[str, Any] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "format": fmt,
            "source": dicom_source(data) if fmt == "dicom" else None,
        }
        self._inputs.append(entry)
        return entry

    def _observe(self, result: Any, entry: dict[str, Any] | None) -> None:
        summary: dict[str, Any] = {}
        for cls in _find(result, "probabilities"):
            task, version = _model_key(cls.model)
            top = float(cls.probabilities[cls.label])
            self._metrics.served_labels.labels(task, version, cls.label).inc()
            self._metrics.top_probability.labels(task, version).observe(top)
            summary.update(
                label=cls.label,
                probability=round(top, 4),
                uncertain=bool(getattr(cls, "uncertain", False)),
                reliable=bool(getattr(cls, "reliable", True)),
            )
        for seg in _find(result, "lesion_area_fraction"):
            summary["lesion_area_fraction"] = round(float(seg.lesion_area_fraction), 6)
        if entry is not None:
            entry["result"] = summary
