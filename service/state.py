"""The app state: what one app instance holds while it runs (settings, metrics, models,
predictor, drain flag), made in the lifespan and kept as `app.state.runtime`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from service.batching import Batcher, BatchingConfig
from service.drift import DriftMonitor
from service.metrics import ServiceMetrics
from service.predictors import Predictor
from service.registry import ModelRegistry
from service.settings import Settings
from service.shadow import ShadowScorer, parse_shadow_version
from shared.quality import load_detector


@dataclass
class AppState:
    settings: Settings
    metrics: ServiceMetrics
    registry: ModelRegistry
    predictor: Predictor
    draining: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM
    drift: DriftMonitor | None = None
    shadow: ShadowScorer | None = None  # SHADOW_VERSION

    @property
    def batcher(self) -> Batcher:
        """The batcher the registry's forwards go through."""
        assert self.registry.batcher is not None  # from_settings sets it
        return self.registry.batcher

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        metrics = ServiceMetrics()
        registry = ModelRegistry(
            settings.MODEL_DIR,
            settings.pinned_versions(),
            metrics,
            gate=settings.gate_floors(),
            inference_runtime=settings.INFERENCE_RUNTIME,
        )
        registry.batcher = Batcher(
            batching_config(settings),
            metrics,
            registry.inference_lock,
            served_models=lambda: registry.loaded().values(),
        )
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
            max_cine_frames=settings.MAX_CINE_FRAMES,
        )
        drift = DriftMonitor(
            metrics, settings.DRIFT_WINDOW, settings.DRIFT_MIN_SAMPLES, settings.DRIFT_MAX_SCANNERS
        )
        predictor.observers.append(drift.observe)
        shadow = None
        if settings.SHADOW_VERSION:
            task, version = parse_shadow_version(settings.SHADOW_VERSION)
            shadow = ShadowScorer(
                registry, metrics, task, version, settings.SHADOW_SAMPLE, settings.SHADOW_QUEUE
            )
            predictor.observers.append(shadow.offer)
        return cls(settings, metrics, registry, predictor, drift=drift, shadow=shadow)


def batching_config(settings: Settings) -> BatchingConfig:
    """The batcher's knobs, from the settings."""
    return BatchingConfig(
        max_batch_size=settings.MAX_BATCH_SIZE,
        max_wait_s=settings.MAX_BATCH_WAIT_MS / 1000,
        max_queue=settings.MAX_QUEUE,
        deadline_s=settings.REQUEST_DEADLINE_MS / 1000 or None,
        threads_alone=settings.TORCH_THREADS,
        threads_batched=min(settings.TORCH_THREADS_BATCHED, settings.TORCH_THREADS),
        precision=settings.INFERENCE_PRECISION,
        freeze=settings.INFERENCE_FREEZE,
        spin_us=settings.INFERENCE_SPIN_US,
        onnx_arena=settings.INFERENCE_ONNX_ARENA,
    )
