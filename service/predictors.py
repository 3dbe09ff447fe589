"""The pre-process -> predict -> post-process triad behind each endpoint.

Everything here is synchronous and runs in a worker thread, never on the event loop. Decoding and
preprocessing come from `shared/` with the parameters of the artifact being served, so a model
sees exactly the tensor its training saw for the same bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydicom import Dataset

from service import tracing
from service.batching import last_forward, request_started
from service.metrics import ServiceMetrics
from service.registry import LoadedModel, ModelRegistry
from service.settings import DEFAULT_MAX_CINE_FRAMES
from shared.decoding import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_DECODED_BYTES,
    DecodedImage,
    OpenedImage,
    open_image,
    sniff_format,
)
from shared.dicom_policy import check_ultrasound_image
from shared.errors import ImageTooLargeError
from shared.inference import lesion_map, lesion_mask, model_input, split_outputs
from shared.labels import LESION_CLASSES, TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.postprocessing import class_probabilities, lesion_geometry
from shared.preprocessing import Layout
from shared.quality import OodDetector, Quality, feature_quality
from shared.variants import GRAPH_CLASSIFY, GRAPH_FULL

ALL_FRAMES = "all"  # ?frame=all: every frame of a cine loop
# Frames per forward with ?frame=all, and the decoded pixels held at once (large frames make
# smaller batches, so a loop of 40 M pixel frames costs what one frame does).
CINE_BATCH_FRAMES = 16
CINE_BATCH_PIXELS = 16_000_000


@dataclass
class ImageRequest:
    """The bytes of one request and how the client described them."""

    data: bytes
    declared_format: str | None = None  # from the media type; None: sniff
    frame: int | Literal["all"] = 0  # ALL_FRAMES: every frame
    facts: dict[str, Any] = field(default_factory=dict)  # for the request log; no patient data


class TooManyFramesError(ImageTooLargeError):
    """?frame=all on a loop with more frames than the cine cap (MAX_CINE_FRAMES)."""

    code = "too_many_frames"


@dataclass(frozen=True)
class ImageFacts:
    """What was analysed: the decoded frame, its format, size and index, and its DICOM header."""

    format: str
    width: int
    height: int
    frame: int
    n_frames: int
    quality: Quality  # is it like the scans the models learnt from
    pixels: np.ndarray = field(repr=False, compare=False)  # (H, W) uint8, the analysed frame
    # The source's header (no pixel data) for a DICOM input; None for PNG and JPEG.
    dicom: Dataset | None = field(default=None, repr=False, compare=False)


# Without a setting or an artifact's own value: no class has a majority of the probability.
DEFAULT_UNCERTAIN_BELOW = 0.5


@dataclass(frozen=True)
class Classification:
    label: str
    probabilities: dict[str, float]  # calibrated when the artifact declares a calibration
    model: LoadedModel
    calibrated: bool = False
    uncertain: bool = False  # the top probability is under the uncertain threshold
    reliable: bool = True  # neither uncertain nor on an image flagged out of distribution

    @property
    def lesion_probability(self) -> float:
        return sum(p for name, p in self.probabilities.items() if name in LESION_CLASSES)


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray = field(repr=False, compare=False)  # (H, W) uint8, 0 / 255, frame-sized
    lesion_area_fraction: float
    bbox: tuple[int, int, int, int] | None  # x, y, width, height
    model: LoadedModel


@dataclass(frozen=True)
class FrameResult:
    """One frame of a ?frame=all analysis, as far as it was analysed."""

    frame: int
    classification: Classification | None  # None where the endpoint does not classify
    lesion_area_fraction: float | None  # None where the frame was not segmented


@dataclass(frozen=True)
class Analysis:
    """The raw result of one request: numbers and arrays, no encoding.

    `image`, `classification` and `segmentation` are those of the analysed frame; with
    ?frame=all, of the key frame (see `Predictor.analyse`), and `frames` lists every frame.
    """

    image: ImageFacts
    classification: Classification | None
    segmentation: Segmentation | None
    frames: tuple[FrameResult, ...] | None = None

    @property
    def largest_lesion_frame(self) -> int | None:
        """The frame with the largest lesion area (the earliest of equals); None without one."""
        best = None
        for result in self.frames or ():
            area = result.lesion_area_fraction or 0.0
            if area > 0 and (best is None or area > best[0]):
                best = (area, result.frame)
        return best[1] if best else None


@dataclass(frozen=True)
class _Plan:
    """Which models answer a request: `classifier` gives the label, `segmenter` the mask (the
    same joint model for both when one is loaded); `segment`: "always" or "lesion" (only frames
    labelled benign or malignant, as /diagnose does)."""

    classifier: LoadedModel | None
    segmenter: LoadedModel | None
    segment: Literal["always", "lesion"] = "always"

    @property
    def classifier_graph(self) -> str:
        """The classify-only graph when nothing else needs the classifier's forward."""
        model = self.classifier
        if model is not None and self.segmenter is None and GRAPH_CLASSIFY in model.graphs:
            return GRAPH_CLASSIFY
        return GRAPH_FULL

    @property
    def models(self) -> list[LoadedModel]:
        return list({id(m): m for m in (self.classifier, self.segmenter) if m}.values())


@dataclass(frozen=True)
class _Candidate:
    """The best key frame so far, with what it needs to become the answer."""

    rank: tuple[float, float]
    image: DecodedImage
    classification: Classification | None
    segmentation: Segmentation | None
    quality: float | None  # the forward's quality score; None: the image statistics decide


def _rank(classification: Classification | None, segmentation: Segmentation | None) -> tuple:
    """Key-frame order: the larger lesion, then the likelier lesion."""
    area = segmentation.lesion_area_fraction if segmentation else 0.0
    return (area, classification.lesion_probability if classification else 0.0)


class Predictor:
    """Runs requests against the models the registry serves at the moment each request starts."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServiceMetrics,
        max_pixels: int,
        max_frames: int,
        detector: OodDetector,
        uncertain_below: float | None = None,
        allow_non_ultrasound: bool = False,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        max_cine_frames: int = DEFAULT_MAX_CINE_FRAMES,
    ) -> None:
        self.registry = registry
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.max_decoded_bytes = max_decoded_bytes
        self.max_aspect_ratio = max_aspect_ratio
        self.max_cine_frames = max_cine_frames
        self.detector = detector
        self.uncertain_below = uncertain_below  # None: each artifact's own, else the default
        self.allow_non_ultrasound = allow_non_ultrasound
        self._stage = metrics.stage_latency
        # Called with each answered Analysis (drift monitoring, shadow scoring); each must be
        # quick and never raise.
        self.observers: list[Callable[[Analysis], None]] = []

    def _observe(
        self, stage: str, task: str, started: float, attributes: dict[str, Any] | None = None
    ) -> float:
        """Time `stage` into its histogram and, when tracing, a span with `attributes`."""
        now = time.perf_counter()
        self._stage.labels(stage, task).observe(now - started)
        tracing.record_stage(stage, started, now, {"busi.task": task, **(attributes or {})})
        return now

    # --- stages ------------------------------------------------------------------------------

    def open(self, request: ImageRequest) -> OpenedImage:
        """Bytes -> an image whose header passed every check; no pixel decoded yet.

        Raises the InputError subclasses of open_image, and NotUltrasoundError /
        NonImageDicomError for DICOM objects that are no ultrasound image.
        """
        started = time.perf_counter()
        request.facts.update(
            bytes=len(request.data),
            sha256=hashlib.sha256(request.data).hexdigest()[:12],
            format=sniff_format(request.data),
        )
        if request.facts["format"] == "dicom" and not self.allow_non_ultrasound:
            check_ultrasound_image(request.data)  # before any pixel is decoded
        image = open_image(
            request.data,
            declared_format=request.declared_format,
            max_pixels=self.max_pixels,
            max_frames=self.max_frames,
            max_decoded_bytes=self.max_decoded_bytes,
            max_aspect_ratio=self.max_aspect_ratio,
        )
        request.facts.update(n_frames=image.n_frames)
        self._observe("decode", "", started)
        return image

    def decode(self, request: ImageRequest) -> DecodedImage:
        """Bytes -> the requested frame, canonical grayscale (frame 0 for ?frame=all)."""
        image = self.open(request)
        return self._decode_frame(image, 0 if request.frame == ALL_FRAMES else request.frame)

    def _decode_frame(self, image: OpenedImage, frame: int) -> DecodedImage:
        started = time.perf_counter()
        decoded = image.decode(frame)
        self._observe("decode", "", started)
        return decoded

    def input_batch(self, model: LoadedModel, image: DecodedImage) -> tuple[np.ndarray, Layout]:
        """The (1, C, S, S) float32 batch `model` gets for `image`, and where the frame went.

        Raises ImageTooLargeError for content longer than MAX_ASPECT_RATIO times its width."""
        started = time.perf_counter()
        x, layout = model_input(model.preprocessing, image.pixels, self.max_aspect_ratio)
        self._observe("preprocess", model.task, started)
        return x[None], layout

    def _batch(
        self, model: LoadedModel, images: Sequence[DecodedImage]
    ) -> tuple[np.ndarray, list[Layout]]:
        """The (N, C, S, S) batch of `images` for `model`, one forward's worth."""
        inputs = [self.input_batch(model, image) for image in images]
        batch = inputs[0][0] if len(inputs) == 1 else np.concatenate([b for b, _ in inputs])
        return batch, [layout for _, layout in inputs]

    def _forward(
        self, model: LoadedModel, batch: np.ndarray, graph: str = GRAPH_FULL
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(class logits (N, K), mask maps (N, S, S), quality scores (N,)); None for what the
        model's graph does not give."""
        started = time.perf_counter()
        output = self.registry.forward(model, batch, graph)
        queue_wait, rows = last_forward.get()
        forward = {"busi.model_version": model.version, "busi.queue_wait_s": queue_wait,
                   "busi.batch_size": rows, "busi.graph": graph}  # fmt: skip
        self._observe("inference", model.task, started, forward)
        outputs = split_outputs(model.output_names(graph), output)
        return outputs.classes, outputs.masks, outputs.quality

    def _classification(self, model: LoadedModel, logits: np.ndarray) -> Classification:
        calibration = model.calibration
        probabilities = class_probabilities(calibration.apply(logits), model.class_names)
        label = max(probabilities, key=probabilities.__getitem__)
        below = self.uncertain_below
        if below is None:
            below = calibration.uncertain_below
        if below is None:
            below = DEFAULT_UNCERTAIN_BELOW
        return Classification(
            label=label,
            probabilities=probabilities,
            model=model,
            calibrated=calibration.calibrated,
            uncertain=probabilities[label] < below,
        )

    @staticmethod
    def _judged(classification: Classification, facts: ImageFacts) -> Classification:
        """The label is not to be relied on when uncertain or the image looks out of place."""
        reliable = facts.quality.in_distribution and not classification.uncertain
        return replace(classification, reliable=reliable)

    def _segmentation(self, model: LoadedModel, output: np.ndarray, layout: Layout) -> Segmentation:
        """A model-sized map (logits or probability) -> the frame-sized mask and its geometry."""
        frame = lesion_map(output, layout, model.preprocessing, model.output_type)
        mask = lesion_mask(frame, model.threshold)
        geometry = lesion_geometry(mask)
        return Segmentation(
            mask=mask,
            lesion_area_fraction=geometry.area_fraction,
            bbox=geometry.bbox,
            model=model,
        )

    def _run(
        self, plan: _Plan, images: Sequence[DecodedImage]
    ) -> list[tuple[Classification | None, Segmentation | None, float | None]]:
        """Classify and/or segment a batch of frames: one forward per model (one in all for a
        joint model; its classify-only graph when only a label is asked for); with
        `segment="lesion"`, only the frames labelled a lesion are segmented. The third item is
        the frame's quality score when a forward computed one."""
        classifications: list[Classification | None] = [None] * len(images)
        masks: np.ndarray | None = None
        scores: np.ndarray | None = None
        layouts: list[Layout] = []
        if plan.classifier is not None:
            batch, layouts = self._batch(plan.classifier, images)
            logits, masks, scores = self._forward(plan.classifier, batch, plan.classifier_graph)
            assert logits is not None
            started = time.perf_counter()
            classifications = [self._classification(plan.classifier, row) for row in logits]
            self._observe("postprocess", plan.classifier.task, started)
        wanted = [
            i
            for i, classification in enumerate(classifications)
            if plan.segment == "always"
            or (classification is not None and classification.label in LESION_CLASSES)
        ]
        segmentations: list[Segmentation | None] = [None] * len(images)
        segmenter = plan.segmenter
        if segmenter is not None and wanted:
            if segmenter is plan.classifier and masks is not None:  # the joint forward's masks
                rows, at = masks, wanted
            else:
                batch, layouts = self._batch(segmenter, [images[i] for i in wanted])
                _, rows, seg_scores = self._forward(segmenter, batch)
                assert rows is not None
                at = list(range(len(wanted)))
                if scores is None and seg_scores is not None and len(wanted) == len(images):
                    scores = seg_scores
            started = time.perf_counter()
            for i, j in zip(wanted, at, strict=True):
                segmentations[i] = self._segmentation(segmenter, rows[j], layouts[j])
            self._observe("postprocess", segmenter.task, started)
        quality = [None] * len(images) if scores is None else [float(v) for v in scores]
        return list(zip(classifications, segmentations, quality, strict=True))

    def _facts(self, image: DecodedImage, score: float | None = None) -> ImageFacts:
        """What was analysed, with the out-of-distribution verdict on it: from the quality
        score the model's forward computed on its own features when it computes one, else from
        the image statistics (shared.quality)."""
        started = time.perf_counter()
        if score is not None:
            quality = feature_quality(score)
        else:
            quality = self.detector.assess(image.pixels)
        self._observe("quality", "", started)
        height, width = image.pixels.shape
        return ImageFacts(
            image.format,
            width,
            height,
            image.frame,
            image.n_frames,
            quality,
            pixels=image.pixels,
            dicom=image.dicom,
        )

    def _frames(self, request: ImageRequest, image: OpenedImage) -> Sequence[int]:
        if request.frame != ALL_FRAMES:
            return [request.frame]
        if image.n_frames > self.max_cine_frames:
            raise TooManyFramesError(
                f"frame=all analyses at most {self.max_cine_frames} frames (MAX_CINE_FRAMES) "
                f"and this image has {image.n_frames}; ask for single frames with ?frame=N."
            )
        return range(image.n_frames)

    def _batches(self, image: OpenedImage, frames: Sequence[int]) -> Iterator[list[DecodedImage]]:
        """The frames decoded, in batches of at most CINE_BATCH_FRAMES frames and about
        CINE_BATCH_PIXELS pixels: the whole loop is never held decoded."""
        batch: list[DecodedImage] = []
        pixels = 0
        for frame in frames:
            decoded = self._decode_frame(image, frame)
            batch.append(decoded)
            pixels += decoded.pixels.size
            if len(batch) >= CINE_BATCH_FRAMES or pixels >= CINE_BATCH_PIXELS:
                yield batch
                batch, pixels = [], 0
        if batch:
            yield batch

    def analyse(self, request: ImageRequest, plan: _Plan) -> Analysis:
        """Decode, run `plan` on the requested frame (or every frame) and keep the key frame.

        With ?frame=all the key frame is the one with the largest lesion; where no frame has a
        lesion pixel, the one most likely a lesion (benign + malignant probability); the earliest
        of equals. Only it keeps its pixels and mask; the others leave a FrameResult.
        """
        with self.registry.analysing():  # counted: service.batching.Batcher._may_spin
            return self._analyse(request, plan)

    def _analyse(self, request: ImageRequest, plan: _Plan) -> Analysis:
        request_started.set(time.perf_counter())  # REQUEST_DEADLINE_MS counts from here
        self._record_models(request, *plan.models)
        image = self.open(request)
        frames = self._frames(request, image)
        best: _Candidate | None = None
        results: list[FrameResult] = []
        for batch in self._batches(image, frames):
            for decoded, (classification, segmentation, score) in zip(
                batch, self._run(plan, batch), strict=True
            ):
                area = segmentation.lesion_area_fraction if segmentation else None
                results.append(FrameResult(decoded.frame, classification, area))
                rank = _rank(classification, segmentation)
                if best is None or rank > best.rank:
                    best = _Candidate(rank, decoded, classification, segmentation, score)
        assert best is not None  # every image has a frame
        facts = self._facts(best.image, best.quality)
        request.facts.update(frame=facts.frame, frames_analysed=len(results))
        classification = best.classification
        if classification is not None:
            classification = self._judged(classification, facts)
        cine = tuple(results) if request.frame == ALL_FRAMES else None
        analysis = Analysis(facts, classification, best.segmentation, cine)
        for observe in self.observers:
            observe(analysis)
        return analysis

    def _record_models(self, request: ImageRequest, *models: LoadedModel) -> None:
        request.facts["models"] = {model.task: model.version for model in models}

    # --- endpoints ---------------------------------------------------------------------------

    def classify(self, request: ImageRequest) -> Analysis:
        """Raises ModelUnavailableError, or an InputError for bytes that cannot be used."""
        model = self.registry.joint() or self.registry.get(TASK_CLASSIFICATION)
        return self.analyse(request, _Plan(classifier=model, segmenter=None))

    def segment(self, request: ImageRequest) -> Analysis:
        """Raises ModelUnavailableError, or an InputError for bytes that cannot be used."""
        model = self.registry.joint() or self.registry.get(TASK_SEGMENTATION)
        return self.analyse(request, _Plan(classifier=None, segmenter=model))

    def diagnose(self, request: ImageRequest) -> Analysis:
        """Classify; segment when the finding is a lesion (benign or malignant).

        With a joint model loaded this is one forward for both answers.
        """
        joint = self.registry.joint()
        if joint is not None:
            plan = _Plan(classifier=joint, segmenter=joint, segment="lesion")
        else:
            plan = _Plan(
                classifier=self.registry.get(TASK_CLASSIFICATION),
                segmenter=self.registry.get(TASK_SEGMENTATION),
                segment="lesion",
            )
        return self.analyse(request, plan)
