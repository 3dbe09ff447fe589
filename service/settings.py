"""Service configuration: one pydantic-settings class read from the environment."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.decoding import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_PIXELS,
)
from shared.errors import InvalidVersionError
from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION
from shared.manifest import validate_version
from shared.promotion import (
    DEFAULT_MIN_ACCURACY,
    DEFAULT_MIN_DICE,
    DEFAULT_MIN_EVAL_IMAGES,
    GateFloors,
)
from shared.quality import DEFAULT_DETECTOR_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models"
# ?frame=all: a 4 s cine loop at 30 frames/s; longer loops are refused, not truncated.
DEFAULT_MAX_CINE_FRAMES = 120


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_torch_threads() -> int:
    """All usable CPUs: a lone request's forward gets every core (service/batching.py)."""
    return available_cpus()


def default_batched_threads() -> int:
    """All usable CPUs, as for a lone request: with the forwards in ONNX Runtime, 4 clients got
    about 20% more throughput on 2 cores than with one core left to HTTP
    (bench/reports/threads-batched-{1,2}.md; README, Speed and memory)."""
    return available_cpus()


class Settings(BaseSettings):
    """Every knob of the service. Each field is read from the environment variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore")

    MODEL_DIR: Path = Field(
        DEFAULT_MODEL_DIR, description="Registry root: <MODEL_DIR>/<task>/<version>/"
    )
    HOST: str = Field("127.0.0.1", description="Interface to listen on")
    PORT: int = Field(8000, ge=1, le=65535, description="TCP port")
    MAX_BODY_BYTES: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest request body accepted (413 above)"
    )
    MAX_PIXELS: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Largest image (width x height) decoded"
    )
    MAX_FRAMES: int = Field(
        DEFAULT_MAX_FRAMES, ge=1, description="Most frames a multi-frame DICOM may declare"
    )
    MAX_CINE_FRAMES: int = Field(
        DEFAULT_MAX_CINE_FRAMES,
        ge=1,
        description="Most frames ?frame=all analyses in one request (422 above)",
    )
    MAX_DECODED_BYTES: int = Field(
        DEFAULT_MAX_DECODED_BYTES,
        ge=1,
        description="Largest frame as decoded: rows x columns x samples x bytes per sample",
    )
    MAX_ASPECT_RATIO: float = Field(
        DEFAULT_MAX_ASPECT_RATIO, ge=1, description="Longest side over shortest side, at most"
    )
    TORCH_THREADS: int = Field(
        default_factory=default_torch_threads,
        ge=1,
        description="Threads of a lone request's forward (torch intra-op threads, or the ONNX "
        "Runtime session's); default: usable CPUs",
    )
    # --- batching, backpressure, precision (service/batching.py, docs/operations.md) ---------
    TORCH_THREADS_BATCHED: int = Field(
        default_factory=default_batched_threads,
        ge=1,
        description="Threads of a forward of 2 or more requests (torch intra-op threads, or the "
        "ONNX Runtime session's); default: usable CPUs",
    )
    MAX_BATCH_SIZE: int = Field(
        4, ge=1, le=64, description="Most requests grouped into one forward; 1 disables batching"
    )
    MAX_BATCH_WAIT_MS: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Under load (the previous forward was a batch), how long a forward waits for "
        "more requests to join; a lone request never waits",
    )
    MAX_QUEUE: int = Field(
        16, ge=1, description="Requests that may wait for a forward; beyond it 503 at once"
    )
    REQUEST_DEADLINE_MS: float = Field(
        0.0,
        ge=0,
        description="A request whose forward has not started this long after it arrived gets 504 "
        "(deadline_exceeded) and is not analysed; 0: no deadline",
    )
    INFERENCE_RUNTIME: Literal["auto", "torchscript", "onnxruntime"] = Field(
        "auto",
        description="What runs the forwards: auto (ONNX Runtime for an artifact whose manifest "
        "carries a model.onnx validated against model.pt, TorchScript otherwise), torchscript "
        "(always model.pt, fp32 or INFERENCE_PRECISION), onnxruntime (as auto, warning when a "
        "model cannot)",
    )
    INFERENCE_PRECISION: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Arithmetic of the forwards: fp32, or bf16 autocast (validated for the "
        "shipped joint artifact by bench/precision.py, bench/reports/precision.md; applies to "
        "every served model, so only with artifacts validated the same way)",
    )
    INFERENCE_FREEZE: bool = Field(
        False,
        description="Serve a frozen, inference-optimised copy of each model (same fp32 "
        "arithmetic, validated by bench/precision.py); false serves the TorchScript as loaded",
    )
    INFERENCE_SPIN_US: int = Field(
        0,
        ge=0,
        le=100_000,
        description="ONNX Runtime only: in the forward of a lone request while no other request "
        "is being analysed, how long (microseconds) an idle intra-op thread spins for the next "
        "operator before it sleeps; every such forward's end stops the spinning. Forwards beside "
        "other work never spin (it would take the cores that work needs); 0: none spins",
    )
    INFERENCE_ONNX_ARENA: bool = Field(
        True,
        description="ONNX Runtime only: keep forwards' buffers between forwards in one CPU "
        "arena that every session of the process shares (the peak of the largest forward any "
        "of them ran); false frees them when a forward ends",
    )
    CLASSIFICATION_VERSION: str = Field(
        "", description="Pinned classification version; empty serves the promoted one"
    )
    SEGMENTATION_VERSION: str = Field(
        "", description="Pinned segmentation version; empty serves the promoted one"
    )
    DIAGNOSIS_VERSION: str = Field(
        "",
        description=(
            "Pinned joint (diagnosis) version; empty serves the promoted one. A loaded joint model "
            "answers /classify, /segment and /diagnose"
        ),
    )
    GATE_MIN_ACCURACY: float = Field(
        DEFAULT_MIN_ACCURACY,
        ge=0,
        le=1,
        description="Promotion gate: lowest headline accuracy a classification or diagnosis "
        "version may have and serve (its cross-validation, else test, metrics)",
    )
    GATE_MIN_DICE: float = Field(
        DEFAULT_MIN_DICE,
        ge=0,
        le=1,
        description="Promotion gate: lowest lesion Dice a segmentation or diagnosis version "
        "may have and serve",
    )
    GATE_MIN_EVAL_IMAGES: int = Field(
        DEFAULT_MIN_EVAL_IMAGES,
        ge=0,
        description="Promotion gate: fewest images a version's headline metrics may come from",
    )
    RELOAD_INTERVAL_S: float = Field(
        10.0, ge=0, description="Seconds between checks for new model versions; 0 disables"
    )
    GRACEFUL_SHUTDOWN_S: float = Field(
        20.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM"
    )
    UNCERTAIN_BELOW: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "A classification whose top (calibrated) probability is below this is reported "
            "uncertain; unset: the serving artifact's own uncertain_below, else 0.5"
        ),
    )
    OOD_DETECTOR_FILE: Path = Field(
        DEFAULT_DETECTOR_FILE,
        description="The image-statistics out-of-distribution detector the quality flag uses",
    )
    ALLOW_NON_ULTRASOUND_DICOM: bool = Field(
        False,
        description=(
            "Analyse DICOM objects whose Modality is not US or whose SOP class is not an image "
            "(SEG, SR, RT) instead of refusing them with 422"
        ),
    )
    DICOM_UID_ROOT: str = Field(
        "",
        pattern=r"^$|^[12](\.(0|[1-9][0-9]*)){1,12}\.?$",
        max_length=40,
        description=(
            "Your organisation's UID root for the SEG and SR results; empty: UUID-derived "
            "2.25.<uuid> UIDs (PS3.5 B.2), which need no registered root"
        ),
    )
    RESULTS_STOW_URL: str = Field(
        "",
        pattern=r"^$|^https?://",
        description="STOW-RS URL (e.g. http://pacs/dicom-web/studies) to send each SEG and SR "
        "made by POST /dicomweb/studies to; empty: they are sent nowhere",
    )
    RESULTS_STOW_USERNAME: str = Field("", description="Basic-auth user for RESULTS_STOW_URL")
    RESULTS_STOW_PASSWORD: SecretStr = Field(
        SecretStr(""), description="Basic-auth password for RESULTS_STOW_URL"
    )
    RESULTS_STOW_TOKEN: SecretStr = Field(
        SecretStr(""), description="Bearer token for RESULTS_STOW_URL (instead of basic auth)"
    )
    RESULTS_STOW_ATTEMPTS: int = Field(
        3, ge=1, le=10, description="Tries per delivery to RESULTS_STOW_URL, backing off between"
    )
    RESULTS_STOW_TIMEOUT_S: float = Field(
        15.0,
        gt=0,
        description="Wall-clock limit of one delivery try to RESULTS_STOW_URL (connect, upload "
        "and answer together, not per read)",
    )
    # --- results delivery lane and STOW-RS bounds (service/dicom/delivery.py, docs/operations.md) -
    RESULTS_STOW_DEADLINE_S: float = Field(
        30.0,
        gt=0,
        description="Wall-clock limit of a whole delivery to RESULTS_STOW_URL: waiting for a "
        "slot, every try and the backoff between; past it the instance fails with 0x0110",
    )
    RESULTS_STOW_WORKERS: int = Field(
        4, ge=1, le=64, description="Deliveries to RESULTS_STOW_URL in flight at once"
    )
    RESULTS_STOW_BACKLOG: int = Field(
        256,
        ge=1,
        description="Deliveries that may wait or run; beyond it a STOW-RS request gets 503 with "
        "Retry-After (an instance of a request already running fails with 0x0110)",
    )
    MAX_STOW_INSTANCES: int = Field(
        100, ge=1, description="Most parts (instances) in one STOW-RS request (413 above)"
    )
    MAX_STOW_PIXELS: int = Field(
        200_000_000,
        ge=1,
        description="Most decoded pixels (rows x columns x frames, from the headers) of all the "
        "instances of one STOW-RS request together (413 above)",
    )
    READY_STALL_S: float = Field(
        30.0,
        gt=0,
        description="/readyz answers 503 (stalled) when a request has waited this long for a "
        "forward, or no worker thread has freed up for this long",
    )
    FORWARDED_ALLOW_IPS: str = Field(
        "",
        description="Comma-separated proxy addresses (or *) whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed (the audit log's client address); empty: none, the "
        "client address is the TCP peer's",
    )
    DRIFT_WINDOW: int = Field(
        500, ge=1, description="Answers per model version in the drift window (service/drift.py)"
    )
    DRIFT_MIN_SAMPLES: int = Field(
        100, ge=1, description="Answers in the window before busi_drift_psi is exported"
    )
    DRIFT_MAX_SCANNERS: int = Field(
        20, ge=1, description="Manufacturer/model pairs counted by name; later ones are `other`"
    )
    SHADOW_VERSION: str = Field(
        "",
        description="<task>/<version>: a published version to score in the shadow of the "
        "serving one (service/shadow.py); empty: none",
    )
    SHADOW_SAMPLE: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of the task's requests the shadow candidate scores"
    )
    SHADOW_QUEUE: int = Field(
        8, ge=1, description="Requests waiting for the shadow candidate; more are dropped"
    )
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    LOG_FORMAT: Literal["json", "text"] = "json"
    # --- access control, audit and slow clients (docs/operations.md, "Authentication") ------
    API_KEYS_FILE: Path | None = Field(
        None,
        description="File of API keys, one `<key_id> <scope,...> sha256:<hex>` line each (make "
        "one with `python -m service.keys create`); read at start-up. Unset: no authentication, "
        "which the service allows only on a loopback HOST or with ALLOW_OPEN_ACCESS",
    )
    ALLOW_OPEN_ACCESS: bool = Field(
        False,
        description="Serve without API keys on a non-loopback HOST (behind a gateway that "
        "authenticates); without it the service refuses to start open there",
    )
    AUDIT_LOG_FILE: Path | None = Field(
        None,
        description="Audit log (JSON lines, created 0600), separate from the application log: "
        "who asked what, on which input, and the answer. Unset: no audit log",
    )
    HEADER_TIMEOUT_S: float = Field(
        10.0, gt=0, description="Seconds a connection gets to send a request's headers (408)"
    )
    BODY_TIMEOUT_S: float = Field(
        60.0, gt=0, description="Seconds a request gets to send its whole body (408)"
    )
    MAX_CONNECTIONS: int = Field(
        500,
        ge=1,
        description="Open connections (and requests in flight) at most; beyond it new requests "
        "get 503",
    )

    @field_validator("CLASSIFICATION_VERSION", "SEGMENTATION_VERSION", "DIAGNOSIS_VERSION")
    @classmethod
    def _pin_is_a_version_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        try:
            return validate_version(value)
        except InvalidVersionError as exc:
            raise ValueError(exc.message) from exc

    @field_validator("SHADOW_VERSION")
    @classmethod
    def _shadow_is_task_and_version(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        task, _, version = value.partition("/")
        if task not in (TASK_CLASSIFICATION, TASK_SEGMENTATION, TASK_DIAGNOSIS):
            raise ValueError("SHADOW_VERSION is <task>/<version>, e.g. diagnosis/20261204T210000Z")
        try:
            validate_version(version)
        except InvalidVersionError as exc:
            raise ValueError(exc.message) from exc
        return value

    @field_validator("UNCERTAIN_BELOW", "OOD_DETECTOR_FILE", mode="before")
    @classmethod
    def _empty_means_default(cls, value: object, info: ValidationInfo) -> object:
        # compose passes an unset variable as "": the documented default, not a parse error
        if value == "":
            return None if info.field_name == "UNCERTAIN_BELOW" else DEFAULT_DETECTOR_FILE
        return value

    @field_validator("API_KEYS_FILE", "AUDIT_LOG_FILE", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        return None if value == "" else value

    def gate_floors(self) -> GateFloors:
        """The promotion gate's floors (shared.promotion)."""
        return GateFloors(
            min_accuracy=self.GATE_MIN_ACCURACY,
            min_dice=self.GATE_MIN_DICE,
            min_eval_images=self.GATE_MIN_EVAL_IMAGES,
        )

    def pinned_versions(self) -> dict[str, str | None]:
        """{task: pinned version or None}."""
        return {
            TASK_CLASSIFICATION: self.CLASSIFICATION_VERSION or None,
            TASK_SEGMENTATION: self.SEGMENTATION_VERSION or None,
            TASK_DIAGNOSIS: self.DIAGNOSIS_VERSION or None,
        }


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
