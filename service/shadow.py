"""Shadow scoring: a published candidate version answers a sampled share of the live requests on
the side, and how often it agrees with the serving version is counted per pair of versions.

SHADOW_VERSION names the candidate as `<task>/<version>` (a version published in MODEL_DIR,
promoted or not). It is verified, loaded and warmed up like any served version
(service.registry.load_model), beside the serving one. When the analysis of a request by a
model of the candidate's task is done (its response is then encoded and sent), a SHADOW_SAMPLE
share of them is queued with the analysed frame (its pixels, nothing else) on a bounded queue of
SHADOW_QUEUE entries: a full queue drops the new entry (counted) rather than wait, so queueing
never delays the request it shadows. One background thread takes them one at a time and runs the
candidate through the same preprocessing, forward, calibration and mask code as the served
answer (service.predictors). Its forwards take the lock of the served ones, one image at a time,
so a served forward waits at most for one shadow forward: the cost of shadowing is that share of
the replica's CPU, which SHADOW_SAMPLE sets. It counts:

- `busi_shadow_label_agreement_total{agree}`: the candidate's label equals the served one;
- `busi_shadow_mask_dice`: Dice of the two lesion masks (1 when both are empty) where the served
  answer has a mask (/segment, or /diagnose of a lesion); the candidate's mask is empty when it
  labels the frame normal, as /diagnose would answer.

`python -m training promote --shadow-metrics URL` reads these figures back from /metrics.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.metrics import ServiceMetrics
from service.predictors import Analysis, Predictor, _Plan
from service.registry import LoadedModel, ModelRegistry, load_model
from shared.decoding import DecodedImage
from shared.errors import ArtifactError
from shared.labels import (
    LESION_CLASSES,
    TASK_CLASSIFICATION,
    TASK_DIAGNOSIS,
    TASK_SEGMENTATION,
    TASKS,
)
from shared.quality import load_detector
from shared.store import verify_artifact
from shared.variants import GRAPH_FULL

log = logging.getLogger(__name__)


def parse_shadow_version(value: str) -> tuple[str, str]:
    """`<task>/<version>` -> (task, version). Raises ValueError naming the expected form."""
    task, sep, version = value.partition("/")
    if not sep or task not in TASKS or not version:
        raise ValueError(f"SHADOW_VERSION is <task>/<version> with a task of {', '.join(TASKS)}")
    return task, version


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two 0/255 masks of the same shape; 1 when both are empty."""
    x, y = a > 0, b > 0
    total = int(x.sum()) + int(y.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(x, y).sum()) / total


@dataclass(frozen=True)
class _Job:
    serving: str
    frame: DecodedImage
    label: str | None
    mask: np.ndarray | None


class _DirectForward:
    """The candidate's forwards, one request at a time, under the lock of the served ones; kept
    out of the batcher so that its queue, batch sizes and deadlines describe served traffic."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def forward(self, model: LoadedModel, batch: np.ndarray, graph: str = GRAPH_FULL) -> Any:
        """The candidate's forward of `graph`, as ModelRegistry.forward answers it."""
        batcher = self.registry.batcher
        assert batcher is not None
        return batcher.run(model, batch, graph, batcher.config.threads_alone)


class ShadowScorer:
    """Runs a candidate version in the shadow of the serving one (see the module docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServiceMetrics,
        task: str,
        version: str,
        sample: float = 0.1,
        max_queue: int = 8,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError("SHADOW_SAMPLE is a share between 0 and 1")
        if max_queue < 1:
            raise ValueError("SHADOW_QUEUE is at least 1")
        self.registry = registry
        self.metrics = metrics
        self.task = task
        self.version = version
        self.sample = sample
        self.candidate: LoadedModel | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_queue)
        self._random = random.Random(seed)
        self._thread: threading.Thread | None = None
        self._pairs: set[str] = set()
        self.scored = threading.Semaphore(0)  # released after each scored job (tests wait on it)

    # --- loading -----------------------------------------------------------------------------

    def load(self) -> bool:
        """Verify, load and warm up the candidate; False (logged) when it cannot serve."""
        context = {"task": self.task, "version": self.version}
        try:
            info = verify_artifact(self.registry.model_dir, self.task, self.version)
            batcher = self.registry.batcher
            self.candidate = load_model(
                info,
                self.registry.inference_lock,
                self.registry.inference_runtime,
                self.registry._forward_threads(),
                arena=batcher.config.onnx_arena if batcher is not None else True,
            )
        except ArtifactError as exc:
            log.error(
                "no shadow scoring: %s version %s cannot be loaded: %s",
                self.task, self.version, exc.message, extra=context,
            )  # fmt: skip
            return False
        self._predictor = Predictor(
            _DirectForward(self.registry),  # type: ignore[arg-type]
            ServiceMetrics(),  # the candidate's stage timings stay out of the service's
            max_pixels=1 << 62,
            max_frames=1,
            detector=load_detector(),
        )
        log.info(
            "shadow scoring: %s version %s answers %.0f%% of the %s requests on the side",
            self.task, self.version, 100 * self.sample, self.task, extra=context,
        )  # fmt: skip
        return True

    def start(self) -> None:
        if self.candidate is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    # --- the request side --------------------------------------------------------------------

    def offer(self, analysis: Analysis) -> None:
        """Queue `analysis`'s frame for the candidate when sampled; never blocks, never raises."""
        try:
            self._offer(analysis)
        except Exception:
            log.exception("shadow scoring failed to queue an answer")

    def _serving_model(self, analysis: Analysis) -> LoadedModel | None:
        for part in (analysis.classification, analysis.segmentation):
            if part is not None and part.model.task == self.task:
                return part.model
        return None

    def _offer(self, analysis: Analysis) -> None:
        serving = self._serving_model(analysis)
        if self.candidate is None or serving is None:
            return
        pair = serving.version
        if pair not in self._pairs:
            self._pairs.add(pair)
            self.metrics.zero_shadow_pair(self.task, pair, self.version)
        counter = self.metrics.shadow_requests
        if serving.version == self.version or self._random.random() >= self.sample:
            counter.labels(self.task, pair, self.version, "skipped").inc()
            return
        image = analysis.image
        frame = DecodedImage(image.pixels, image.format, image.frame, image.n_frames)
        label = analysis.classification.label if analysis.classification else None
        # Masks are compared where the served answer has one (/segment, or /diagnose of a
        # lesion); /classify and a /diagnose answered normal compare labels only.
        mask = analysis.segmentation.mask if analysis.segmentation else None
        try:
            self._queue.put_nowait(_Job(pair, frame, label, mask))
        except queue.Full:
            counter.labels(self.task, pair, self.version, "dropped").inc()
            return
        self.metrics.shadow_queue.set(self._queue.qsize())

    # --- the shadow thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            self.metrics.shadow_queue.set(self._queue.qsize())
            if job is None:
                return
            try:
                self._score(job)
            except Exception:
                self.metrics.shadow_requests.labels(
                    self.task, job.serving, self.version, "failed"
                ).inc()
                log.exception("the shadow candidate failed on one request")
            finally:
                self.scored.release()

    def _score(self, job: _Job) -> None:
        candidate = self.candidate
        assert candidate is not None
        classifies = self.task in (TASK_CLASSIFICATION, TASK_DIAGNOSIS)
        segments = self.task in (TASK_SEGMENTATION, TASK_DIAGNOSIS)
        plan = _Plan(
            classifier=candidate if classifies else None,
            segmenter=candidate if segments else None,
        )
        [(classification, segmentation, _quality)] = self._predictor._run(plan, [job.frame])
        labels = ("task", "serving", "candidate")
        pair = dict(zip(labels, (self.task, job.serving, self.version), strict=True))
        if job.label is not None and classification is not None:
            agree = "true" if classification.label == job.label else "false"
            self.metrics.shadow_label_agreement.labels(**pair, agree=agree).inc()
        if job.mask is not None and segmentation is not None:
            mask = segmentation.mask
            if self.task == TASK_DIAGNOSIS and classification is not None:
                if classification.label not in LESION_CLASSES:
                    mask = np.zeros_like(mask)  # as /diagnose would have answered
            self.metrics.shadow_dice.labels(**pair).observe(mask_dice(job.mask, mask))
        self.metrics.shadow_requests.labels(**pair, outcome="scored").inc()
