"""The pre-process -> predict -> post-process triad behind each endpoint.

Everything here is synchronous and runs in a worker thread, never on the event loop. Decoding and
preprocessing come from `shared/` with the parameters of the artifact being served, so a model
sees exactly the tensor its training saw for the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from service.metrics import ServiceMetrics
from service.registry import LoadedModel, ModelRegistry
from shared.decoding import DecodedImage, decode_image, sniff_format
from shared.labels import LESION_CLASSES, TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.postprocessing import class_probabilities, lesion_geometry, probability_to_mask, sigmoid


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


@dataclass(frozen=True)
class Classification:
    label: str
    probabilities: dict[str, float]
    model: LoadedModel


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
        self, registry: ModelRegistry, metrics: ServiceMetrics, max_pixels: int, max_frames: int
    ) -> None:
        self.registry = registry
        self.max_pixels = max_pixels
        self.max_frames = max_frames
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
        image = decode_image(
            request.data,
            declared_format=request.declared_format,
            frame=request.frame,
            max_pixels=self.max_pixels,
            max_frames=self.max_frames,
        )
        request.facts.update(frame=image.frame, n_frames=image.n_frames)
        self._observe("decode", "", started)
        return image

    def input_batch(self, model: LoadedModel, image: DecodedImage) -> np.ndarray:
        """The (1, C, S, S) float32 batch `model` gets for `image`."""
        started = time.perf_counter()
        batch = model.preprocessing(image.pixels)[None]
        self._observe("preprocess", model.task, started)
        return batch

    def _classify(self, model: LoadedModel, image: DecodedImage) -> Classification:
        batch = self.input_batch(model, image)
        started = time.perf_counter()
        logits = self.registry.forward(model, batch)[0]
        started = self._observe("inference", model.task, started)
        probabilities = class_probabilities(logits, model.class_names)
        label = max(probabilities, key=probabilities.__getitem__)
        self._observe("postprocess", model.task, started)
        return Classification(label=label, probabilities=probabilities, model=model)

    def _segment(self, model: LoadedModel, image: DecodedImage) -> Segmentation:
        batch = self.input_batch(model, image)
        started = time.perf_counter()
        output = self.registry.forward(model, batch)[0, 0]
        started = self._observe("inference", model.task, started)
        probability = sigmoid(output) if model.output_type == "logits" else output
        height, width = image.pixels.shape
        mask = probability_to_mask(probability, model.threshold, height, width)
        geometry = lesion_geometry(mask)
        self._observe("postprocess", model.task, started)
        return Segmentation(
            mask_png=encode_png(mask),
            lesion_area_fraction=geometry.area_fraction,
            bbox=geometry.bbox,
            model=model,
        )

    @staticmethod
    def _facts(image: DecodedImage) -> ImageFacts:
        height, width = image.pixels.shape
        return ImageFacts(image.format, width, height, image.frame, image.n_frames)

    def _record_models(self, request: ImageRequest, *models: LoadedModel) -> None:
        request.facts["models"] = {model.task: model.version for model in models}

    # --- endpoints ---------------------------------------------------------------------------

    def classify(self, request: ImageRequest) -> tuple[ImageFacts, Classification]:
        """Raises ModelUnavailableError, or an InputError for bytes that cannot be used."""
        model = self.registry.get(TASK_CLASSIFICATION)
        self._record_models(request, model)
        image = self.decode(request)
        return self._facts(image), self._classify(model, image)

    def segment(self, request: ImageRequest) -> tuple[ImageFacts, Segmentation]:
        """Raises ModelUnavailableError, or an InputError for bytes that cannot be used."""
        model = self.registry.get(TASK_SEGMENTATION)
        self._record_models(request, model)
        image = self.decode(request)
        return self._facts(image), self._segment(model, image)

    def diagnose(self, request: ImageRequest, include_image: bool = False) -> Diagnosis:
        """Classify; segment when the finding is a lesion (benign or malignant).

        With `include_image`, the analysed grayscale frame comes back as a PNG too: a browser
        cannot draw a DICOM, and the outline must sit on exactly the pixels that were analysed.
        """
        classifier = self.registry.get(TASK_CLASSIFICATION)
        segmenter = self.registry.get(TASK_SEGMENTATION)
        self._record_models(request, classifier, segmenter)
        image = self.decode(request)
        classification = self._classify(classifier, image)
        segmentation = None
        if classification.label in LESION_CLASSES:
            segmentation = self._segment(segmenter, image)
        image_png = encode_png(image.pixels) if include_image else None
        return Diagnosis(self._facts(image), classification, segmentation, image_png)
