"""Drift monitoring: what each served model version sees and says, against its training reference.

Every answered request feeds `DriftMonitor.observe` with its analysis (the key frame of a cine
loop): the class probabilities, the out-of-distribution score, the lesion area fraction, the
frame's width and height and, for DICOM, the header's Manufacturer and Manufacturer's Model Name
(a bounded label set; no other header field is read). Each goes to a Prometheus histogram per
model version (service.metrics). When the version's manifest carries a `drift_reference`
(shared.drift), the last DRIFT_WINDOW values of each quantity are kept and their population
stability index against the reference is exported as `busi_drift_psi`. A version without a
reference gets the histograms and one log line saying so, but no PSI gauge.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from service.metrics import ServiceMetrics
from shared.drift import (
    HEIGHT,
    LESION_AREA,
    MANIFEST_FIELD,
    OOD_SCORE,
    WIDTH,
    DriftReference,
    bin_index,
    probability_quantity,
    psi,
)
from shared.labels import LESION_CLASSES

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 500
DEFAULT_MIN_SAMPLES = 100
DEFAULT_MAX_SCANNERS = 20
NO_SCANNER = "none"  # PNG / JPEG: no header
OTHER = "other"
_LABEL_CHARS = 40


def _scanner_label(value: Any) -> str:
    """A header string as a metric label: printable, trimmed, at most _LABEL_CHARS."""
    text = "".join(ch for ch in str(value or "") if ch.isprintable()).strip()
    return text[:_LABEL_CHARS] or "unknown"


@dataclass
class _Window:
    """The last values of one quantity of one version, as bin indices, with running counts."""

    size: int
    bins: int
    values: deque[int] = field(default_factory=deque)
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = [0] * self.bins

    def add(self, index: int) -> None:
        self.values.append(index)
        self.counts[index] += 1
        if len(self.values) > self.size:
            self.counts[self.values.popleft()] -= 1


@dataclass
class _Watched:
    """One model version being watched: its reference (None without one) and windows."""

    reference: DriftReference | None
    windows: dict[str, _Window] = field(default_factory=dict)
    observed: int = 0


class DriftMonitor:
    """Feeds the drift histograms and, where the artifact has a reference, the PSI gauges."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        window: int = DEFAULT_WINDOW,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        max_scanners: int = DEFAULT_MAX_SCANNERS,
    ) -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError("need 1 <= min_samples <= window")
        self.metrics = metrics
        self.window = window
        self.min_samples = min_samples
        self.max_scanners = max_scanners
        self._watched: dict[tuple[str, str, str], _Watched] = {}
        self._scanners: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # --- per version -------------------------------------------------------------------------

    def _watch(self, model: Any) -> _Watched:
        key = (model.task, model.version, model.info.sha256)
        watched = self._watched.get(key)
        if watched is not None:
            return watched
        context = {"task": model.task, "version": model.version}
        raw = model.info.metadata.get(MANIFEST_FIELD)
        reference = None
        if raw is None:
            log.info(
                "%s version %s carries no drift reference: its inputs and answers are counted, "
                "but no drift statistic is exported (python -m training drift-reference "
                "publishes a version with one)",
                model.task, model.version, extra=context,
            )  # fmt: skip
        else:
            try:
                reference = DriftReference.from_dict(raw)
            except ValueError as exc:
                log.error(
                    "%s version %s has an unreadable drift reference (%s): no drift statistic "
                    "is exported for it", model.task, model.version, exc, extra=context,
                )  # fmt: skip
        watched = _Watched(reference)
        if reference is not None:
            for quantity in reference.quantities:
                bins = len(reference.edges[quantity]) - 1
                watched.windows[quantity] = _Window(self.window, bins)
            log.info(
                "watching %s version %s for drift against its reference (%s; sites %s)",
                model.task, model.version, ", ".join(watched.windows), ", ".join(reference.sites),
                extra=context,
            )  # fmt: skip
        self._watched[key] = watched
        self.metrics.drift_window.labels(model.task, model.version).set(0)
        return watched

    # --- one answer --------------------------------------------------------------------------

    def observe(self, analysis: Any) -> None:
        """Count one answered request (a service.predictors.Analysis). Never raises into the
        request: a failure here is logged and the answer goes out all the same."""
        try:
            self._observe(analysis)
        except Exception:
            log.exception("drift monitoring failed on one answer")

    def _observe(self, analysis: Any) -> None:
        classification = analysis.classification
        segmentation = analysis.segmentation
        facts = analysis.image
        model = classification.model if classification is not None else segmentation.model
        values: dict[str, float] = {
            OOD_SCORE: float(facts.quality.score),
            WIDTH: float(facts.width),
            HEIGHT: float(facts.height),
        }
        if classification is not None:
            for name, p in classification.probabilities.items():
                values[probability_quantity(name)] = float(p)
        area = None
        if segmentation is not None:
            area = float(segmentation.lesion_area_fraction)
        elif classification is not None and classification.label not in LESION_CLASSES:
            area = 0.0  # /diagnose does not segment a frame labelled normal
        task, version = model.task, model.version
        m = self.metrics
        with self._lock:
            for name, p in classification.probabilities.items() if classification else ():
                m.seen_probability.labels(task, version, name).observe(p)
            m.seen_ood_score.labels(task, version).observe(values[OOD_SCORE])
            m.seen_size.labels(task, version, WIDTH).observe(values[WIDTH])
            m.seen_size.labels(task, version, HEIGHT).observe(values[HEIGHT])
            m.seen_scanner.labels(task, version, *self._scanner(facts.dicom)).inc()
            watched = self._watch(model)
            if area is not None:
                # the segmenter's version: the same model unless two separate ones answer
                seg_model = segmentation.model if segmentation is not None else model
                m.seen_lesion_area.labels(seg_model.task, seg_model.version).observe(area)
                if seg_model is model:
                    values[LESION_AREA] = area
            self._update(task, version, watched, values)

    def _scanner(self, header: Any) -> tuple[str, str]:
        if header is None:
            return NO_SCANNER, NO_SCANNER
        pair = (
            _scanner_label(header.get("Manufacturer", "")),
            _scanner_label(header.get("ManufacturerModelName", "")),
        )
        if pair in self._scanners:
            return pair
        if len(self._scanners) >= self.max_scanners:
            return OTHER, OTHER
        self._scanners.add(pair)
        return pair

    def _update(self, task: str, version: str, watched: _Watched, values: dict[str, float]) -> None:
        reference = watched.reference
        if reference is None:
            return
        watched.observed += 1
        self.metrics.drift_window.labels(task, version).set(min(watched.observed, self.window))
        for quantity, window in watched.windows.items():
            value = values.get(quantity)
            if value is None:
                continue
            window.add(bin_index(reference.edges[quantity], value))
            if len(window.values) >= self.min_samples:
                statistic = psi(reference.pooled(quantity), window.counts)
                self.metrics.drift.labels(task, version, quantity).set(statistic)

    def statistics(self) -> dict[str, dict[str, float]]:
        """{"task/version": {quantity: PSI}} of the windows that hold enough values."""
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            for (task, version, _), watched in self._watched.items():
                if watched.reference is None:
                    continue
                figures = {
                    q: psi(watched.reference.pooled(q), w.counts)
                    for q, w in watched.windows.items()
                    if len(w.values) >= self.min_samples
                }
                out[f"{task}/{version}"] = figures
        return out
