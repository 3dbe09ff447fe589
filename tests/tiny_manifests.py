"""Manifests of the tiny test models (tests/conftest.py), and a version folder written around
publish_artifact's validation for tests of what the service refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.manifest import MODEL_FILE
from shared.preprocessing import Preprocessing
from shared.promotion import PROMOTIONS_FILE
from shared.store import MANIFEST_FILE, sha256_file

CLASSIFIER_PREPROCESSING = Preprocessing(resize=64, crop=56)
SEGMENTER_PREPROCESSING = Preprocessing(resize=64, resize_mode="stretch")


TINY_TEST_METRICS = {
    TASK_CLASSIFICATION: {"accuracy": 0.9, "n": 100},
    TASK_SEGMENTATION: {"lesion_dice": 0.9, "n_lesion_images": 80, "n_normal_images": 20},
}


def _metadata(task: str, preprocessing: Preprocessing, output: dict[str, Any]) -> dict[str, Any]:
    side = preprocessing.output_size
    metadata: dict[str, Any] = {
        "name": f"tiny-{task}",
        "architecture": f"tiny_{task}",
        "preprocessing": preprocessing.to_metadata(),
        "input": {
            "channels": preprocessing.channels,
            "height": side,
            "width": side,
            "dtype": "float32",
            "value_range": "ImageNet-normalised",
            "source": "8-bit grayscale (shared.decoding)",
        },
        "output": output,
        # figures that pass the promotion gate's default floors (the rigged models earn them on
        # the rigged inputs the tests send; they were never measured on scans)
        "metrics": {"test": TINY_TEST_METRICS[task]},
        "training": {"preset": "tiny", "epochs": 0, "seed": 0},
        "data_fingerprint": {"sha256": "0" * 64, "n_images": 0, "split_file": "none"},
        "framework": {"torch": torch.__version__},
        "intended_use": "tests only",
    }
    if task == TASK_CLASSIFICATION:
        metadata["class_names"] = list(CLASS_NAMES)
    return metadata


def classification_metadata() -> dict[str, Any]:
    return _metadata(
        TASK_CLASSIFICATION,
        CLASSIFIER_PREPROCESSING,
        {"type": "logits", "shape": [len(CLASS_NAMES)]},
    )


def segmentation_metadata() -> dict[str, Any]:
    side = SEGMENTER_PREPROCESSING.output_size
    return _metadata(
        TASK_SEGMENTATION,
        SEGMENTER_PREPROCESSING,
        {"type": "logits", "shape": [1, side, side], "threshold": 0.5},
    )


def write_unchecked_artifact(
    model_dir: Path, task: str, version: str, model_file: Path, manifest: dict[str, Any]
) -> Path:
    """A version folder written without publish_artifact's validation, as another tool (or an
    older release) might have: for testing that the service refuses what publish would."""
    folder = Path(model_dir) / task / version
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(Path(model_file).read_bytes())
    manifest = {
        "schema_version": 1,
        "task": task,
        "version": version,
        "model_file": MODEL_FILE,
        "sha256": sha256_file(folder / MODEL_FILE),
        "created_at": "2026-01-01T00:00:00+00:00",
        **manifest,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def promote_unchecked(model_dir: Path, task: str, version: str) -> None:
    """Add `version` to the promotions record without the gate (an operator editing the file, or
    a record written under other floors): for testing that the service's own gate refuses it."""
    path = Path(model_dir) / PROMOTIONS_FILE
    record = json.loads(path.read_text()) if path.exists() else {"schema_version": 1}
    record.setdefault("promoted", {}).setdefault(task, []).append(version)
    path.write_text(json.dumps(record))
