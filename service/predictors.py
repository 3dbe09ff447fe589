"""The pre-process -> predict -> post-process triad behind each endpoint.

Everything here is synchronous and runs in a worker thread, never on the event loop. Decoding and
preprocessing come from `shared/` with the parameters of the artifact being served, so a model
sees exactly the tensor its training saw for the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from service.batching import request_started
from service.metrics import ServiceMetrics
from service.registry import LoadedModel, ModelRegistry
from shared.decoding import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_DECODED_BYTES,
    DecodedImage,
    decode_image,
    sniff_format,
)
from shared.dicom_policy import check_ultrasound_image
from shared.errors import ImageTooLargeError
from shared.labels import LESION_CLASSES, TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.postprocessing import class_probabilities, lesion_geometry, sigmoid
from shared.preprocessing import Layout
from shared.quality import OodDetector, Quality


@dataclass
class ImageRequest:
    """The bytes of one request and how the client described them."""

    data: bytes
    declared_format: str | None = None  # from the media type; None: sniff
    frame: int = 0
    facts: dict[str, Any] = field(default_factory=dict)  # for the request log; no patient data


@dataclass(frozen=True)
class ImageFacts:
    """What was analysed: the decoded image's format, size and frame."""

    format: str
    width: int
    height: int
    frame: int
    n_frames: int
    quality: Quality  # is it like the scans the models learnt from


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


@dataclass(frozen=True)
class Segmentation:
    mask_png: bytes  # one channel, the input's width and height, 0 / 255
    lesion_area_fraction: float
    bbox: tuple[int, int, int, int] | None  # x, y, width, height
    model: LoadedModel


@dataclass(frozen=True)
class Diagnosis:
    image: ImageFacts
    classification: Classification
    segmentation: Segmentation | None
    image_png: bytes | None = None  # the analysed frame, when the client asked for it


def encode_png(pixels: np.ndarray) -> bytes:
    """A (H, W) uint8 array as a one-channel PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


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
    ) -> None:
        self.registry = registry
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.max_decoded_bytes = max_decoded_bytes
        self.max_aspect_ratio = max_aspect_ratio
        self.detector = detector
        self.uncertain_below = uncertain_below  # None: each artifact's own, else the default
        self.allow_non_ultrasound = allow_non_ultrasound
        self._stage = metrics.stage_latency

    def _observe(self, stage: str, task: str, started: float) -> float:
        now = time.perf_counter()
        self._stage.labels(stage, task).observe(now - started)
        return now

    # --- stages ------------------------------------------------------------------------------

    def decode(self, request: ImageRequest) -> DecodedImage:
        """Bytes -> canonical grayscale image. Raises the InputError subclasses of decode_image."""
        started = time.perf_counter()
        request.facts.update(
            bytes=len(request.data),
            sha256=hashlib.sha256(request.data).hexdigest()[:12],
            format=sniff_format(request.data),
        )
        if request.facts["format"] == "dicom" and not self.allow_non_ultrasound:
            check_ultrasound_image(request.data)  # before any pixel is decoded
        image = decode_image(
            request.data,
            declared_format=request.declared_format,
            frame=request.frame,
            max_pixels=self.max_pixels,
            max_frames=self.max_frames,
            max_decoded_bytes=self.max_decoded_bytes,
            max_aspect_ratio=self.max_aspect_ratio,
        )
        request.facts.update(frame=image.frame, n_frames=image.n_frames)
        self._observe("decode", "", started)
        return image

    def input_batch(self, model: LoadedModel, image: DecodedImage) -> tuple[np.ndarray, Layout]:
        """The (1, C, S, S) float32 batch `model` gets for `image`, and where the frame went."""
        started = time.perf_counter()
        layout = model.preprocessing.layout(image.pixels)
        if max(layout.resized) > self.max_aspect_ratio * model.preprocessing.resize:
            # trim_border can leave a thin strip of a frame that passed the decoder's aspect cap;
            # scaling its shorter side up would cost memory without bound.
            raise ImageTooLargeError(
                f"The image's content is more than {self.max_aspect_ratio:g} times longer than "
                "it is wide; it was not analysed."
            )
        resized = model.preprocessing.resize_image(image.pixels, layout)
        batch = model.preprocessing.normalise(resized)[None]
        self._observe("preprocess", model.task, started)
        return batch, layout

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
        probability = output if model.output_type == "probability" else sigmoid(output)
        frame = model.preprocessing.frame_map(probability.astype(np.float32), layout)
        mask = np.where(frame > model.threshold, np.uint8(255), np.uint8(0))  # no int64 copy
        geometry = lesion_geometry(mask)
        return Segmentation(
            mask_png=encode_png(mask),
            lesion_area_fraction=geometry.area_fraction,
            bbox=geometry.bbox,
            model=model,
        )

    def _classify(self, model: LoadedModel, image: DecodedImage) -> Classification:
        batch, _ = self.input_batch(model, image)
        started = time.perf_counter()
        logits = self.registry.forward(model, batch)[0]
        started = self._observe("inference", model.task, started)
        classification = self._classification(model, logits)
        self._observe("postprocess", model.task, started)
        return classification

    def _segment(self, model: LoadedModel, image: DecodedImage) -> Segmentation:
        batch, layout = self.input_batch(model, image)
        started = time.perf_counter()
        output = self.registry.forward(model, batch)[0, 0]
        started = self._observe("inference", model.task, started)
        segmentation = self._segmentation(model, output, layout)
        self._observe("postprocess", model.task, started)
        return segmentation

    def _joint(
        self, model: LoadedModel, image: DecodedImage, segment: str
    ) -> tuple[Classification, Segmentation | None]:
        """One forward of the joint model. `segment`: "always", "never" or "lesion" (only when
        the finding is benign or malignant, as /diagnose does)."""
        batch, layout = self.input_batch(model, image)
        started = time.perf_counter()
        class_logits, mask_logits = self.registry.forward(model, batch)
        started = self._observe("inference", model.task, started)
        classification = self._classification(model, class_logits[0])
        segmentation = None
        if segment == "always" or (segment == "lesion" and classification.label in LESION_CLASSES):
            segmentation = self._segmentation(model, mask_logits[0, 0], layout)
        self._observe("postprocess", model.task, started)
        return classification, segmentation

    def _facts(self, image: DecodedImage) -> ImageFacts:
        """What was analysed, with the out-of-distribution verdict on it."""
        started = time.perf_counter()
        quality = self.detector.assess(image.pixels)
        self._observe("quality", "", started)
        height, width = image.pixels.shape
        return ImageFacts(image.format, width, height, image.frame, image.n_frames, quality)

    def _record_models(self, request: ImageRequest, *models: LoadedModel) -> None:
        request.facts["models"] = {model.task: model.version for model in models}

    # --- endpoints ---------------------------------------------------------------------------

    def classify(self, request: ImageRequest) -> tuple[ImageFacts, Classification]:
        """Raises ModelUnavailableError, or an InputError for bytes that cannot be used."""
        request_started.set(time.perf_counter())  # REQUEST_DEADLINE_MS counts from here
        joint = self.registry.joint()
        model = joint or self.registry.get(TASK_CLASSIFICATION)
        self._record_models(request, model)
        image = self.decode(request)
        facts = self._facts(image)
        if joint is not None:
            return facts, self._judged(self._joint(joint, image, "never")[0], facts)
        return facts, self._judged(self._classify(model, image), facts)

    def segment(self, request: ImageRequest) -> tuple[ImageFacts, Segmentation]:
        """Raises ModelUnavailableError, or an InputError for bytes that cannot be used."""
        request_started.set(time.perf_counter())  # REQUEST_DEADLINE_MS counts from here
        joint = self.registry.joint()
        model = joint or self.registry.get(TASK_SEGMENTATION)
        self._record_models(request, model)
        image = self.decode(request)
        if joint is not None:
            segmentation = self._joint(joint, image, "always")[1]
            assert segmentation is not None
            return self._facts(image), segmentation
        return self._facts(image), self._segment(model, image)

    def diagnose(self, request: ImageRequest, include_image: bool = False) -> Diagnosis:
        """Classify; segment when the finding is a lesion (benign or malignant).

        With a joint model loaded this is one forward for both answers. With `include_image`,
        the analysed grayscale frame comes back as a PNG too: a browser cannot draw a DICOM,
        and the outline must sit on exactly the pixels that were analysed.
        """
        request_started.set(time.perf_counter())
        joint = self.registry.joint()
        if joint is not None:
            self._record_models(request, joint)
            image = self.decode(request)
            classification, segmentation = self._joint(joint, image, "lesion")
        else:
            classifier = self.registry.get(TASK_CLASSIFICATION)
            segmenter = self.registry.get(TASK_SEGMENTATION)
            self._record_models(request, classifier, segmenter)
            image = self.decode(request)
            classification = self._classify(classifier, image)
            segmentation = None
            if classification.label in LESION_CLASSES:
                segmentation = self._segment(segmenter, image)
        image_png = encode_png(image.pixels) if include_image else None
        facts = self._facts(image)
        return Diagnosis(facts, self._judged(classification, facts), segmentation, image_png)
