"""What one app instance holds while it runs: settings, metrics, models, predictor, drain flag."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from service.metrics import ServiceMetrics
from service.predictors import Predictor
from service.registry import ModelRegistry
from service.settings import Settings
from shared.quality import load_detector


@dataclass
class Runtime:
    settings: Settings
    metrics: ServiceMetrics
    registry: ModelRegistry
    predictor: Predictor
    draining: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        metrics = ServiceMetrics()
        registry = ModelRegistry(settings.MODEL_DIR, settings.pinned_versions(), metrics)
        predictor = Predictor(
            registry,
            metrics,
            settings.MAX_PIXELS,
            settings.MAX_FRAMES,
            detector=load_detector(settings.OOD_DETECTOR_FILE),
            uncertain_below=settings.UNCERTAIN_BELOW,
            allow_non_ultrasound=settings.ALLOW_NON_ULTRASOUND_DICOM,
            max_decoded_bytes=settings.MAX_DECODED_BYTES,
            max_aspect_ratio=settings.MAX_ASPECT_RATIO,
        )
        return cls(settings, metrics, registry, predictor)
