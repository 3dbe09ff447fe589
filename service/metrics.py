"""Prometheus metrics of one app instance, on its own CollectorRegistry so tests can build many."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared.drift import LESION_AREA, OOD_SCORE, WIDTH, default_edges
from shared.labels import TASKS

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

# CPU inference of one image takes milliseconds to about a second; buckets cover that range.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A top probability of a 3-class softmax is at least 1/3.
_TOP_PROBABILITY_BUCKETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
# The drift histograms share their buckets with the reference's bins (shared.drift), so a panel
# of the one reads like the other.
_PROBABILITY_BUCKETS = default_edges(("p",))["probability_p"][1:]
_OOD_BUCKETS = default_edges(())[OOD_SCORE][1:]
_AREA_BUCKETS = default_edges(())[LESION_AREA][1:]
_SIDE_BUCKETS = default_edges(())[WIDTH][1:]
_DICE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

# Reasons and outcomes known in advance: their counters are exported at 0 from the start, so an
# alert or panel on them reads 0, not "no data" (which cannot be told from a misspelt name).
GATE_REASONS = ("smoke", "task", "input", "no_metrics", "eval_images", "accuracy", "dice")
SLOW_CLIENT_PHASES = ("headers", "body", "header_size")
RELOAD_OUTCOMES = ("loaded", "failed", "rejected", "error")
REJECTED_REASONS = ("queue_full", "deadline", "connection_limit")
SHADOW_OUTCOMES = ("scored", "dropped", "failed", "skipped")


class ServiceMetrics:
    """The service's metrics; see docs/operations.md for what each one means."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            "busi_http_request_duration_seconds",
            "Time from the first byte of a request to the last byte of its response.",
            ["endpoint", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "busi_stage_duration_seconds",
            "Time spent in one stage of the pipeline (decode, preprocess, inference, postprocess).",
            ["stage", "task"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "busi_request_failures",
            "Requests answered with an error, by the error code of the envelope.",
            ["reason"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "busi_model_info",
            "1 for each model version being served.",
            ["task", "name", "version", "sha256"],
            registry=self.registry,
        )
        self.model_runtime = Gauge(
            "busi_model_runtime",
            "1 for each model version being served, labelled with what runs its forwards "
            "(torchscript: model.pt; onnxruntime: the validated model.onnx).",
            ["task", "version", "runtime"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "busi_model_reloads",
            "Attempts to load a model version, by outcome (loaded, failed, rejected, error).",
            ["task", "outcome"],
            registry=self.registry,
        )
        self.fallback = Gauge(
            "busi_model_fallback",
            "1 while another version serves a task: its promoted (or pinned) one would not serve.",
            ["task"],
            registry=self.registry,
        )
        self.gate_refusals = Counter(
            "busi_model_gate_refusals",
            "Promoted (or pinned) versions the promotion gate refused to serve, by reason "
            "(smoke, task, input, no_metrics, eval_images, accuracy, dice).",
            ["task", "reason"],
            registry=self.registry,
        )
        self.promotion_changes = Counter(
            "busi_model_promotion_changes",
            "Changes to a task's promoted versions (promote, demote) picked up from the record.",
            ["task"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "busi_ready", "1 when every model is loaded and warmed up.", registry=self.registry
        )
        self.inference_queue = Gauge(
            "busi_inference_waiting",
            "Requests waiting for a forward (queued in the batcher; at most MAX_QUEUE).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "busi_batch_size",
            "Images per forward: requests the batcher grouped into one batch.",
            ["task"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "busi_queue_wait_seconds",
            "Time a request waited in the batcher's queue before its forward started.",
            ["task"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.inference_rejected = Counter(
            "busi_inference_rejected",
            "Requests refused before their forward: queue_full (503), deadline (504), or "
            "connection_limit (503: MAX_CONNECTIONS held; the app never saw the request).",
            ["reason"],
            registry=self.registry,
        )

        self.dicomweb_instances = Counter(
            "busi_dicomweb_instances",
            "Instances received by STOW-RS (POST /dicomweb/studies), by outcome (analysed, "
            "failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.results_deliveries = Counter(
            "busi_results_deliveries",
            "SEG + SR deliveries to RESULTS_STOW_URL, by outcome (delivered, failed); a failed "
            "one is reported to the sender as a failed instance.",
            ["outcome"],
            registry=self.registry,
        )

        # --- the process, the build, what is served (issue 12) ----------------------------
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        ProcessCollector(registry=self.registry)
        self.build = Info(
            "busi_build", "The running build: package and runtime versions.", registry=self.registry
        )
        self.build.info(_build_facts())
        self.served_labels = Counter(
            "busi_served_labels",
            "Classifications served, by the model version that made them and the label: a "
            "shift in the mix is the first sign of drift.",
            ["task", "version", "label"],
            registry=self.registry,
        )
        self.top_probability = Histogram(
            "busi_top_probability",
            "The (calibrated) probability of the served label, by model version.",
            ["task", "version"],
            buckets=_TOP_PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.slow_client_timeouts = Counter(
            "busi_slow_client_timeouts",
            "Connections answered 408 because a request's headers (HEADER_TIMEOUT_S) or body "
            "(BODY_TIMEOUT_S) came too slowly, and oversized headers (431).",
            ["phase"],
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "busi_audit_write_failures",
            "Audit records that could not be written to AUDIT_LOG_FILE.",
            registry=self.registry,
        )

        # --- drift: what each served version sees and says (service/drift.py) -----------------
        self.seen_probability = Histogram(
            "busi_drift_class_probability",
            "The served (calibrated) probability of each class, by model version.",
            ["task", "version", "class_name"],
            buckets=_PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.seen_ood_score = Histogram(
            "busi_drift_ood_score",
            "The out-of-distribution score of each analysed frame (above 1 is flagged), by "
            "the model version that answered.",
            ["task", "version"],
            buckets=_OOD_BUCKETS,
            registry=self.registry,
        )
        self.seen_lesion_area = Histogram(
            "busi_drift_lesion_area_fraction",
            "The served lesion area fraction (0 when the served label is normal), by model "
            "version.",
            ["task", "version"],
            buckets=_AREA_BUCKETS,
            registry=self.registry,
        )
        self.seen_size = Histogram(
            "busi_drift_input_pixels",
            "The analysed frame's width and height in pixels (`side`), by model version.",
            ["task", "version", "side"],
            buckets=_SIDE_BUCKETS,
            registry=self.registry,
        )
        self.seen_scanner = Counter(
            "busi_drift_scanner",
            "Analysed DICOM inputs by the header's Manufacturer and Manufacturer's Model Name "
            "(a bounded set: DRIFT_MAX_SCANNERS pairs, then `other`); PNG and JPEG inputs "
            "count as `none`.",
            ["task", "version", "manufacturer", "model"],
            registry=self.registry,
        )
        self.drift = Gauge(
            "busi_drift_psi",
            "Population stability index of the last DRIFT_WINDOW values of a quantity against "
            "the version's training reference (shared.drift): under 0.1 stable, above 0.25 a "
            "large shift. Absent for a version whose artifact carries no reference.",
            ["task", "version", "quantity"],
            registry=self.registry,
        )
        self.drift_window = Gauge(
            "busi_drift_window_size",
            "Values in the drift window of a version (the PSI is exported from "
            "DRIFT_MIN_SAMPLES on).",
            ["task", "version"],
            registry=self.registry,
        )

        # --- shadow scoring of a candidate version (service/shadow.py) -----------------------
        self.shadow_requests = Counter(
            "busi_shadow_requests",
            "Requests offered to the shadow candidate, by outcome: scored, dropped (the queue "
            "was full), failed (its forward raised), skipped (not in the sampled share).",
            ["task", "serving", "candidate", "outcome"],
            registry=self.registry,
        )
        self.shadow_label_agreement = Counter(
            "busi_shadow_label_agreement",
            "Shadow-scored requests by whether the candidate's label equals the served one "
            "(agree: true / false).",
            ["task", "serving", "candidate", "agree"],
            registry=self.registry,
        )
        self.shadow_dice = Histogram(
            "busi_shadow_mask_dice",
            "Dice between the served lesion mask and the candidate's on the same frame (1 when "
            "both are empty).",
            ["task", "serving", "candidate"],
            buckets=_DICE_BUCKETS,
            registry=self.registry,
        )
        self.shadow_queue = Gauge(
            "busi_shadow_waiting",
            "Requests waiting for the shadow candidate (at most SHADOW_QUEUE; more are dropped).",
            registry=self.registry,
        )
        self._zero_known_labels()

    def _zero_known_labels(self) -> None:
        """Export every labelled counter an alert or the dashboard reads at 0 from the start."""
        from service.errors import error_codes  # errors -> schemas -> ...: not at import

        for code in error_codes():
            self.failures.labels(code)
        for task in TASKS:
            for reason in GATE_REASONS:
                self.gate_refusals.labels(task, reason)
            for outcome in RELOAD_OUTCOMES:
                self.reloads.labels(task, outcome)
            self.promotion_changes.labels(task)
        for phase in SLOW_CLIENT_PHASES:
            self.slow_client_timeouts.labels(phase)
        for reason in REJECTED_REASONS:
            self.inference_rejected.labels(reason)
        for outcome in ("delivered", "failed"):
            self.results_deliveries.labels(outcome)
        for outcome in ("analysed", "failed"):
            self.dicomweb_instances.labels(outcome)

    def zero_shadow_pair(self, task: str, serving: str, candidate: str) -> None:
        """Export a serving/candidate pair's shadow counters at 0 (the pair is known now)."""
        for outcome in SHADOW_OUTCOMES:
            self.shadow_requests.labels(task, serving, candidate, outcome)
        for agree in ("true", "false"):
            self.shadow_label_agreement.labels(task, serving, candidate, agree)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _build_facts() -> dict[str, str]:
    return {
        "version": _version("busi-service"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "pydicom": _version("pydicom"),
    }


class DeliveryMetrics:
    """The results-delivery lane's gauges (service.dicom.delivery), on the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "busi_results_delivery_backlog",
            "Deliveries to RESULTS_STOW_URL waiting for a slot or running.",
            registry=registry,
        )
        self.refused = Counter(
            "busi_results_delivery_refused",
            "Deliveries refused at once because RESULTS_STOW_BACKLOG were already waiting.",
            registry=registry,
        )
