"""The model artifact format and registry layout, shared by the training jobs and the service.

Layout on the model volume:

    <MODEL_DIR>/<task>/<version>/model.pt        TorchScript file
    <MODEL_DIR>/<task>/<version>/model.onnx      optional: the same model for ONNX Runtime
    <MODEL_DIR>/<task>/<version>/metadata.json   the manifest, written last
    <MODEL_DIR>/promotions.json                  which versions may serve (shared.promotion)

A version is published atomically: everything is written into a hidden temporary folder beside
the target, each file is fsync'ed, the manifest (which holds the model file's sha256) is written
last, and the folder is renamed into place. Readers ignore hidden folders and trust a version only
when its manifest is complete and the checksum matches, so a half-written or tampered version is
never loaded.

The manifest is one typed object, `Manifest`: training builds the dict, `publish_artifact`
validates it with `Manifest.from_dict` (an invalid one is never written) and writes
`Manifest.to_dict()`; the service reads `ArtifactInfo.manifest` at load time. Schema version 1 is
the only one; fields added since (`status`, `runtimes`) are optional, so every version-1 manifest
ever written still reads, and an older reader ignores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from shared.calibration import Calibration
from shared.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    InvalidVersionError,
)
from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_SEGMENTATION, TASKS
from shared.preprocessing import Preprocessing

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
MANIFEST_FILE = "metadata.json"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 1_000_000
REQUIRED_FIELDS = (
    "schema_version",
    "task",
    "name",
    "version",
    "created_at",
    "model_file",
    "sha256",
    "preprocessing",
    "input",
    "output",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- the manifest ----------------------------------------------------------------------------

STATUS_CANDIDATE = "candidate"
STATUS_SMOKE = "smoke"
STATUSES = (STATUS_CANDIDATE, STATUS_SMOKE)
"""`status` of a published artifact: a smoke run (never served) or a candidate (served once
promoted and past the gate; see shared.promotion). Promotion itself is not in the manifest,
which never changes after publishing, but in the model directory's promotions record."""

RUNTIME_ONNX = "onnxruntime"
ONNX_FILE = "model.onnx"
RUNTIME_FILES = {RUNTIME_ONNX: ONNX_FILE}
"""Runtimes other than TorchScript an artifact may carry a file for, and its full graph's name."""

GRAPH_FULL = "full"
GRAPH_CLASSIFY = "classify"
GRAPHS = (GRAPH_FULL, GRAPH_CLASSIFY)
"""What a runtime file computes: the whole network (`full`: every output of model.pt) or only
what a label needs (`classify`: the encoder and the class head, no mask decoder)."""
PRECISIONS = ("fp32", "int8")

_GRAPH_STEMS = {GRAPH_FULL: "model", GRAPH_CLASSIFY: "classify"}


def runtime_file_name(runtime: str, graph: str = GRAPH_FULL, precision: str = "fp32") -> str:
    """The file a runtime variant ships in: model.onnx, classify.onnx, model.int8.onnx, ...

    Raises ValueError for an unknown runtime, graph or precision.
    """
    if runtime not in RUNTIME_FILES or graph not in GRAPHS or precision not in PRECISIONS:
        raise ValueError(f"no runtime file for {runtime!r} / {graph!r} / {precision!r}")
    suffix = RUNTIME_FILES[runtime].rsplit(".", 1)[1]
    middle = "" if precision == "fp32" else f".{precision}"
    return f"{_GRAPH_STEMS[graph]}{middle}.{suffix}"


RUNTIME_FILE_NAMES = frozenset(
    runtime_file_name(r, g, p) for r in RUNTIME_FILES for g in GRAPHS for p in PRECISIONS
)

VALIDATION_BAR = {"accuracy": 0.005, "macro_auc": 0.005, "lesion_dice": 0.005}
"""How far a runtime variant's figures may lie from the TorchScript fp32 model's on the same
images (absolute difference) for the variant to serve: 0.5 points of accuracy, 0.005 macro AUC,
0.005 lesion Dice (issue 10)."""

RUNTIME_AGREEMENT_ATOL = 1e-2
"""How far a runtime variant's logits may lie from model.pt's on the same input (fp32 reordering
gives ~1e-4 on the shipped model, up to 2e-3 on its mask logits of magnitude ~10; a logit 0.01
off moves a probability by at most 0.0025). The export refuses a file beyond it, and so does the
service at load."""

OUTPUT_TYPES = ("logits", "probability")
INPUT_SOURCE = "8-bit grayscale (shared.decoding)"
"""What `input.source` says when the model takes the decoder's canonical image."""


class ManifestError(ArtifactIntegrityError):
    """A manifest that does not describe a usable artifact; `problems` names each bad field."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("invalid manifest: " + "; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class InputSpec:
    """The model's input: a float tensor of shape (N, channels, height, width).

    `extra` keeps any further keys a job wrote (e.g. a classifier's `mask_channel`).
    """

    channels: int
    height: int
    width: int
    dtype: str = "float32"
    value_range: str = ""
    source: str = INPUT_SOURCE
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "dtype": self.dtype,
            "value_range": self.value_range,
            "source": self.source,
        }


@dataclass(frozen=True)
class ClassOutput:
    """Class scores, one per class name, in `class_names` order, and their calibration."""

    shape: tuple[int, ...]
    type: str = "logits"
    calibration: Calibration = Calibration()

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": self.type, "shape": list(self.shape)}
        if self.calibration != Calibration():
            spec.update(self.calibration.to_manifest())
        return spec


@dataclass(frozen=True)
class MaskOutput:
    """A lesion map of shape (1, height, width); a pixel is lesion above `threshold`."""

    shape: tuple[int, ...]
    type: str = "logits"
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "shape": list(self.shape), "threshold": self.threshold}


@dataclass(frozen=True)
class OutputSpec:
    """What a forward returns: class scores, a mask, or (a diagnosis model) both, in that order.

    JSON: a classifier's and a segmenter's spec is the output's own ({"type", "shape", ...}); a
    diagnosis model's is {"type": "joint", "classes": {...}, "mask": {...}}.
    """

    classes: ClassOutput | None = None
    mask: MaskOutput | None = None

    @property
    def type(self) -> str:
        if self.classes and self.mask:
            return "joint"
        return (self.classes or self.mask).type  # type: ignore[union-attr]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of each output (without the batch axis), in the order the model returns."""
        return [o.shape for o in (self.classes, self.mask) if o is not None]

    def to_dict(self) -> dict[str, Any]:
        if self.classes and self.mask:
            return {"type": "joint", "classes": self.classes.to_dict(), "mask": self.mask.to_dict()}
        return (self.classes or self.mask).to_dict()  # type: ignore[union-attr]


@dataclass(frozen=True)
class RuntimeVariant:
    """The same model in another runtime, shipped beside model.pt and validated against it.

    JSON (one entry of the manifest's `runtimes` list):

        {"runtime": "onnxruntime", "file": "model.onnx", "sha256": "<hex>", "precision": "fp32",
         "validation": {"source": "...", "command": "...", "n_images": 623,
                        "reference": {"accuracy": .., "macro_auc": .., "lesion_dice": ..},
                        "variant": {"accuracy": .., "macro_auc": .., "lesion_dice": ..},
                        ...}}

    `reference` holds the TorchScript fp32 figures and `variant` this runtime's, on the same
    images (out-of-fold where the job had folds); figures a task has no use for are left out.
    The variant serves only when it `holds`: every figure it shares with `reference` lies within
    VALIDATION_BAR (and it shares at least one).
    """

    runtime: str
    file: str
    sha256: str
    precision: str = "fp32"
    validation: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    graph: str = GRAPH_FULL
    outputs: tuple[str, ...] = ()  # the graph's output names in order; () when not recorded

    @property
    def deltas(self) -> dict[str, float]:
        """variant - reference for each figure of VALIDATION_BAR both record."""
        reference = self.validation.get("reference") or {}
        variant = self.validation.get("variant") or {}
        return {
            key: float(variant[key]) - float(reference[key])
            for key in VALIDATION_BAR
            if _is_number(reference.get(key)) and _is_number(variant.get(key))
        }

    @property
    def holds(self) -> bool:
        deltas = self.deltas
        return bool(deltas) and all(abs(d) <= VALIDATION_BAR[k] + 1e-12 for k, d in deltas.items())

    def to_dict(self) -> dict[str, Any]:
        data = {
            **self.extra,
            "runtime": self.runtime,
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "validation": dict(self.validation),
        }
        if self.graph != GRAPH_FULL:
            data["graph"] = self.graph
        if self.outputs:
            data["outputs"] = list(self.outputs)
        return data


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _runtimes(value: object, problems: list[str]) -> tuple[RuntimeVariant, ...]:
    if not isinstance(value, list):
        problems.append("runtimes must be a list")
        return ()
    variants = []
    for i, entry in enumerate(value):
        where = f"runtimes[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        runtime, file = entry.get("runtime"), entry.get("file")
        sha, precision = entry.get("sha256"), entry.get("precision", "fp32")
        graph, outputs = entry.get("graph", GRAPH_FULL), entry.get("outputs", [])
        validation = entry.get("validation", {})
        bad = len(problems)
        if runtime not in RUNTIME_FILES:
            problems.append(f"{where}.runtime must be one of {list(RUNTIME_FILES)}")
        if graph not in GRAPHS:
            problems.append(f"{where}.graph must be one of {list(GRAPHS)}")
        if precision not in PRECISIONS:
            problems.append(f"{where}.precision must be one of {list(PRECISIONS)}")
        expected = runtime_file_name(runtime, graph, precision) if len(problems) == bad else file
        if file != expected:
            problems.append(f"{where}.file must be {expected!r}")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            problems.append(f"{where}.sha256 must be 64 lower-case hex digits")
        if not isinstance(validation, dict):
            problems.append(f"{where}.validation must be an object")
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            problems.append(f"{where}.outputs must be a list of names")
        if (runtime, graph, precision) in {(v.runtime, v.graph, v.precision) for v in variants}:
            problems.append(f"{where}: {runtime!r} {graph} {precision} listed twice")
        if len(problems) == bad:
            known = {"runtime", "file", "sha256", "precision", "validation", "graph", "outputs"}
            variants.append(RuntimeVariant(
                runtime, file, sha, precision, validation,
                {k: v for k, v in entry.items() if k not in known}, graph, tuple(outputs),
            ))  # fmt: skip
    return tuple(variants)


@dataclass(frozen=True)
class Evaluation:
    """The headline figures of `metrics`, which a promotion gate compares with its floors.

    Read from `metrics.cross_validation.plain` (pooled out-of-fold figures; a job's
    `cross_validation` section itself when it has no `plain` part) when present, else from
    `metrics.test` (a held-out split). `source` is "" when the manifest carries neither.
    """

    source: str = ""
    n_images: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    malignant_sensitivity: float | None = None
    lesion_dice: float | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """How the model was trained, exactly as the job wrote it, with typed views of its keys."""

    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        return str(self.config.get("preset") or "")

    @property
    def smoke(self) -> bool:
        """A smoke run: the job's `smoke` flag, or a preset named for smoke runs."""
        return self.config.get("smoke") is True or "smoke" in self.preset

    @property
    def epochs(self) -> int | None:
        recipe = self.config.get("recipe")
        epochs = self.config.get(
            "epochs", recipe.get("epochs") if isinstance(recipe, dict) else None
        )
        return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


@dataclass(frozen=True)
class Manifest:
    """An artifact's metadata.json as one validated object.

    Build one with `from_dict` (which validates every field and raises ManifestError listing
    what is wrong) and write it with `to_dict`. Keys this class does not know are kept in `extra`
    and written back, so a newer job's additions survive an older reader.
    """

    task: str
    name: str
    version: str
    created_at: str
    sha256: str
    preprocessing: Preprocessing
    input: InputSpec
    output: OutputSpec
    class_names: tuple[str, ...] = ()
    architecture: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    training: TrainingConfig = TrainingConfig()
    data_fingerprint: Mapping[str, Any] = field(default_factory=dict)
    framework: Mapping[str, Any] = field(default_factory=dict)
    intended_use: str | None = None
    status: str = STATUS_CANDIDATE
    runtimes: tuple[RuntimeVariant, ...] = ()
    schema_version: int = SCHEMA_VERSION
    model_file: str = MODEL_FILE
    extra: Mapping[str, Any] = field(default_factory=dict)

    def runtime(
        self, name: str, graph: str = GRAPH_FULL, precision: str = "fp32"
    ) -> RuntimeVariant | None:
        """The variant for runtime `name` of that graph and precision, or None when the artifact
        carries none."""
        return next(
            (
                v
                for v in self.runtimes
                if (v.runtime, v.graph, v.precision) == (name, graph, precision)
            ),
            None,
        )

    @property
    def evaluation(self) -> Evaluation:
        """The headline figures of `metrics` (see Evaluation)."""
        return _evaluation(self.metrics, [])

    @property
    def smoke(self) -> bool:
        return self.status == STATUS_SMOKE

    def input_problems(self) -> list[str]:
        """Why the service's decoder + `preprocessing` cannot feed this model ([] when they can).

        The service hands a model `preprocessing(decoded 8-bit grayscale image)`: a float32
        (channels, side, side) tensor. A model that declares another input (e.g. a classifier
        that also takes a mask channel) is a valid artifact that this service cannot serve.
        """
        problems = []
        side = self.preprocessing.output_size
        if self.input.shape != (self.preprocessing.channels, side, side):
            problems.append(
                f"manifest input {list(self.input.shape)} disagrees with its preprocessing "
                f"({self.preprocessing.channels} x {side} x {side})"
            )
        if self.input.dtype != "float32":
            problems.append("manifest input dtype must be float32")
        if self.input.source != INPUT_SOURCE:
            problems.append(f"manifest input source must be {INPUT_SOURCE!r}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            **self.extra,
            "schema_version": self.schema_version,
            "task": self.task,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "model_file": self.model_file,
            "sha256": self.sha256,
            "status": self.status,
            "preprocessing": self.preprocessing.to_metadata(),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "metrics": dict(self.metrics),
            "training": dict(self.training.config),
            "data_fingerprint": dict(self.data_fingerprint),
            "framework": dict(self.framework),
        }
        if self.class_names:
            data["class_names"] = list(self.class_names)
        if self.architecture is not None:
            data["architecture"] = self.architecture
        if self.intended_use is not None:
            data["intended_use"] = self.intended_use
        if self.runtimes:
            data["runtimes"] = [v.to_dict() for v in self.runtimes]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate and read a manifest dict (schema version 1, as every job has written it).

        Raises ManifestError naming every missing or invalid field.
        """
        if not isinstance(data, Mapping):
            raise ManifestError(["the manifest must be a JSON object"])
        problems: list[str] = []
        missing = [key for key in REQUIRED_FIELDS if key not in data]
        if missing:
            problems.append(f"missing fields {missing}")
        if "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
            problems.append(f"schema_version must be {SCHEMA_VERSION}")
        task = data.get("task")
        if "task" in data and task not in TASKS:
            problems.append(f"task must be one of {list(TASKS)}")
        text = {
            key: _text(data, key, problems)
            for key in ("name", "version", "created_at", "model_file", "sha256")
        }
        if text["version"] is not None and not _is_version_name(text["version"]):
            problems.append("version is not a valid version name")
        if text["model_file"] is not None and text["model_file"] != MODEL_FILE:
            problems.append(f"model_file must be {MODEL_FILE!r}")
        if text["sha256"] is not None and not re.fullmatch(r"[0-9a-f]{64}", text["sha256"]):
            problems.append("sha256 must be 64 lower-case hex digits")
        architecture = _text(data, "architecture", problems, required=False)
        intended_use = _text(data, "intended_use", problems, required=False)

        preprocessing = None
        if "preprocessing" in data:
            try:
                if not isinstance(data["preprocessing"], dict):
                    raise TypeError("not an object")
                preprocessing = Preprocessing.from_metadata(data["preprocessing"])
            except (TypeError, ValueError) as exc:
                problems.append(f"preprocessing is invalid: {exc}")
        spec_in = _input_spec(data.get("input"), problems) if "input" in data else None
        class_names = _class_names(data.get("class_names"), task, problems)
        side = preprocessing.output_size if preprocessing else None
        spec_out = None
        if "output" in data and task in TASKS:
            spec_out = _output_spec(data["output"], task, len(class_names), side, problems)

        sections = {}
        for key in ("metrics", "training", "data_fingerprint", "framework"):
            value = data.get(key, {})
            if not isinstance(value, dict):
                problems.append(f"{key} must be an object")
                value = {}
            sections[key] = value
        training = TrainingConfig(sections["training"])
        if "smoke" in training.config and not isinstance(training.config["smoke"], bool):
            problems.append("training.smoke must be true or false")
        _evaluation(sections["metrics"], problems)
        status = data.get("status", STATUS_SMOKE if training.smoke else STATUS_CANDIDATE)
        if status not in STATUSES:
            problems.append(f"status must be one of {list(STATUSES)}")
        elif training.smoke and status != STATUS_SMOKE:
            problems.append("status must be 'smoke' for a smoke run (training.smoke)")

        runtimes = _runtimes(data["runtimes"], problems) if "runtimes" in data else ()

        if problems:
            raise ManifestError(problems)
        assert preprocessing and spec_in and spec_out and task  # no problems: all were read
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            task=task,
            name=text["name"],
            version=text["version"],
            created_at=text["created_at"],
            sha256=text["sha256"],
            preprocessing=preprocessing,
            input=spec_in,
            output=spec_out,
            class_names=class_names,
            architecture=architecture,
            metrics=sections["metrics"],
            training=training,
            data_fingerprint=sections["data_fingerprint"],
            framework=sections["framework"],
            intended_use=intended_use,
            status=status,
            runtimes=runtimes,
            schema_version=data["schema_version"],
            model_file=text["model_file"],
            extra={k: v for k, v in data.items() if k not in known},
        )


def _is_version_name(name: str) -> bool:
    try:
        validate_version(name)
    except InvalidVersionError:
        return False
    return True


def _text(data: Mapping[str, Any], key: str, problems: list[str], required: bool = True) -> Any:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        if key in data or required:
            problems.append(f"{key} must be a non-empty string")
        return None
    return value


def _positive_ints(value: object, where: str, problems: list[str]) -> tuple[int, ...] | None:
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        problems.append(f"{where} must be a list of positive integers")
        return None
    return tuple(value)


def _input_spec(value: object, problems: list[str]) -> InputSpec | None:
    if not isinstance(value, dict):
        problems.append("input must be an object")
        return None
    shape = _positive_ints(
        [value.get("channels"), value.get("height"), value.get("width")],
        "input channels, height and width",
        problems,
    )
    texts = {}
    for key, default in (("dtype", "float32"), ("value_range", ""), ("source", INPUT_SOURCE)):
        texts[key] = value.get(key, default)
        if not isinstance(texts[key], str):
            problems.append(f"input.{key} must be a string")
    if shape is None or not all(isinstance(t, str) for t in texts.values()):
        return None
    known = ("channels", "height", "width", "dtype", "value_range", "source")
    return InputSpec(*shape, **texts, extra={k: v for k, v in value.items() if k not in known})


def _class_names(value: object, task: object, problems: list[str]) -> tuple[str, ...]:
    if task == TASK_SEGMENTATION and value is None:
        return ()
    if (
        not isinstance(value, list | tuple)
        or not all(isinstance(v, str) for v in value)
        or sorted(value) != sorted(CLASS_NAMES)
    ):
        problems.append(f"class_names must be an ordering of {list(CLASS_NAMES)}")
        return ()
    return tuple(value)


def _output_type(
    spec: dict, where: str, problems: list[str], allowed: tuple[str, ...] = OUTPUT_TYPES
) -> str:
    kind = spec.get("type", "logits")
    if kind not in allowed:
        problems.append(f"{where}.type must be one of {list(allowed)}")
    return kind


def _class_output(
    spec: dict,
    where: str,
    n_classes: int,
    problems: list[str],
    allowed: tuple[str, ...] = OUTPUT_TYPES,
) -> ClassOutput | None:
    kind = _output_type(spec, where, problems, allowed)
    shape = _positive_ints(spec.get("shape"), f"{where}.shape", problems)
    if shape is not None and n_classes and shape != (n_classes,):
        problems.append(f"{where}.shape must be [number of class_names]")
    if shape is None or not n_classes:
        return None
    try:
        calibration = Calibration.from_manifest(spec, n_classes)
    except ArtifactIntegrityError as exc:
        problems.append(f"{where}: {exc.message}")
        return None
    return ClassOutput(shape=shape, type=kind, calibration=calibration)


def _mask_output(
    spec: dict, where: str, problems: list[str], allowed: tuple[str, ...] = OUTPUT_TYPES
) -> MaskOutput | None:
    kind = _output_type(spec, where, problems, allowed)
    shape = _positive_ints(spec.get("shape"), f"{where}.shape", problems)
    if shape is not None and (len(shape) != 3 or shape[0] != 1):
        problems.append(f"{where}.shape must be [1, height, width]")
        shape = None
    threshold = spec.get("threshold", 0.5)
    if (
        not isinstance(threshold, int | float)
        or isinstance(threshold, bool)
        or not 0.0 < threshold < 1.0
    ):
        problems.append(f"{where}.threshold must lie in (0, 1)")
        return None
    return None if shape is None else MaskOutput(shape=shape, type=kind, threshold=float(threshold))


def _output_spec(
    value: object, task: str, n_classes: int, side: int | None, problems: list[str]
) -> OutputSpec | None:
    if not isinstance(value, dict):
        problems.append("output must be an object")
        return None
    if task == TASK_CLASSIFICATION:
        classes = _class_output(value, "output", n_classes, problems)
        return OutputSpec(classes=classes) if classes else None
    if task == TASK_SEGMENTATION:
        mask = _mask_output(value, "output", problems)
        return OutputSpec(mask=mask) if mask else None
    classes_spec, mask_spec = value.get("classes"), value.get("mask")
    if (
        value.get("type") != "joint"
        or not isinstance(classes_spec, dict)
        or not isinstance(mask_spec, dict)
    ):
        problems.append(
            "a diagnosis manifest's output must be {type: joint, classes: {...}, mask: {...}}"
        )
        return None
    logits = ("logits",)  # the joint models are trained on logits; nothing else is defined
    classes = _class_output(classes_spec, "output.classes", n_classes, problems, logits)
    mask = _mask_output(mask_spec, "output.mask", problems, logits)
    if mask is not None and side is not None and mask.shape != (1, side, side):
        problems.append(f"output.mask.shape must be [1, {side}, {side}]")
        return None
    return OutputSpec(classes=classes, mask=mask) if classes and mask else None


def _evaluation(metrics: Mapping[str, Any], problems: list[str]) -> Evaluation:
    section: object = None
    source = ""
    if isinstance(metrics.get("cross_validation"), dict):
        cv = metrics["cross_validation"]
        section, source = (
            (cv["plain"] if isinstance(cv.get("plain"), dict) else cv),
            "cross_validation",
        )
    elif isinstance(metrics.get("test"), dict):
        section, source = metrics["test"], "test"
    if not isinstance(section, dict):
        return Evaluation()
    per_class = section.get("per_class")
    malignant = per_class.get("malignant") if isinstance(per_class, dict) else None
    sensitivity = section.get(
        "malignant_sensitivity", malignant.get("recall") if isinstance(malignant, dict) else None
    )
    figures = {
        "accuracy": section.get("accuracy"),
        "macro_f1": section.get("macro_f1"),
        "malignant_sensitivity": sensitivity,
        "lesion_dice": section.get("lesion_dice"),
    }
    for key, value in figures.items():
        if value is not None and not (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0.0 <= value <= 1.0
        ):
            problems.append(f"metrics.{source}: {key} must be a number in [0, 1]")
            figures[key] = None
    n_images = section.get("n")
    if n_images is None and "n_lesion_images" in section:
        parts = [section.get("n_lesion_images"), section.get("n_normal_images", 0)]
        n_images = sum(parts) if all(isinstance(p, int) for p in parts) else "?"
    if n_images is not None and (
        not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0
    ):
        problems.append(f"metrics.{source}: the number of images must be a whole number")
        n_images = None
    return Evaluation(
        source=source,
        n_images=n_images,
        **{k: None if v is None else float(v) for k, v in figures.items()},
    )


@dataclass(frozen=True)
class ArtifactInfo:
    """A verified version folder and its manifest."""

    task: str
    version: str
    path: Path
    metadata: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    def runtime_path(self, variant: RuntimeVariant) -> Path:
        """Where `variant`'s file lies (verify_artifact has checked its sha256)."""
        return self.path / variant.file

    @property
    def sha256(self) -> str:
        return str(self.metadata["sha256"])

    @cached_property
    def manifest(self) -> Manifest:
        """The typed manifest. Raises ManifestError when a field is missing or invalid."""
        return Manifest.from_dict(self.metadata)


def validate_task(task: str) -> str:
    """Return `task` if it is a known task. Raises InvalidVersionError otherwise."""
    if task not in TASKS:
        raise InvalidVersionError(f"unknown task; expected one of {', '.join(TASKS)}")
    return task


def validate_version(version: str) -> str:
    """Return `version` if it is a safe folder name. Raises InvalidVersionError otherwise.

    Allowed: 1-64 characters of letters, digits, '.', '_', '-', starting with a letter or digit,
    and no '..' anywhere, so a version can never name a path outside its task folder.
    """
    if not isinstance(version, str) or not _NAME_RE.fullmatch(version) or ".." in version:
        raise InvalidVersionError(
            "version names are 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, without '..'"
        )
    return version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_version_name(now: datetime | None = None) -> str:
    """A sortable, unique-enough default version name: UTC time to the second."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def publish_artifact(
    model_dir: Path,
    task: str,
    version: str,
    model_file: Path,
    metadata: Mapping[str, Any],
    runtime_files: Mapping[str, Path] | None = None,
) -> ArtifactInfo:
    """Publish `model_file` (a TorchScript file) with `metadata` as `<model_dir>/<task>/<version>`.

    Fills in schema_version, task, version, model_file, sha256, (if absent) created_at and (if
    absent) status, validates the result as a Manifest and writes its `to_dict()`.
    `runtime_files` maps the file name of each entry of the metadata's `runtimes` list
    (runtime_file_name: model.onnx, classify.onnx, ...; a runtime's name stands for its full fp32
    graph) to the file to copy in; the entry's `file` and sha256 are filled in. The version is
    a candidate: it serves only once promoted (shared.promotion). Raises InvalidVersionError for
    a bad task/version name, ManifestError (an ArtifactIntegrityError) for an invalid manifest,
    and ArtifactIntegrityError if the version already exists.
    """
    validate_task(task)
    validate_version(version)
    task_dir = Path(model_dir) / task
    target = task_dir / version
    if target.exists() or target.is_symlink():
        raise ArtifactIntegrityError(f"version {version} of {task} already exists")

    fields_in = dict(metadata)
    fields_in.update(
        schema_version=SCHEMA_VERSION,
        task=task,
        version=version,
        model_file=MODEL_FILE,
        sha256=sha256_file(Path(model_file)),
    )
    fields_in.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    runtime_files = {
        RUNTIME_FILES.get(name, name): Path(path) for name, path in (runtime_files or {}).items()
    }
    entries = [dict(e) if isinstance(e, Mapping) else e for e in fields_in.get("runtimes", [])]
    named = set()
    for entry in entries:
        if isinstance(entry, dict):
            try:
                entry["file"] = runtime_file_name(
                    entry.get("runtime"), entry.get("graph", GRAPH_FULL),
                    entry.get("precision", "fp32"),
                )  # fmt: skip
            except ValueError as exc:
                raise ManifestError([str(exc)]) from exc
            named.add(entry["file"])
    if set(runtime_files) != named:
        raise ArtifactIntegrityError(
            f"runtime files {sorted(runtime_files)} do not match the manifest's runtimes "
            f"{sorted(named)}"
        )
    for entry in entries:
        entry["sha256"] = sha256_file(runtime_files[entry["file"]])
    if entries:
        fields_in["runtimes"] = entries
    manifest = Manifest.from_dict(fields_in)  # an invalid manifest is never written
    task_dir.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=task_dir))
    try:
        with Path(model_file).open("rb") as src, (staging / MODEL_FILE).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        if sha256_file(staging / MODEL_FILE) != manifest.sha256:
            raise ArtifactIntegrityError("model file changed while it was being published")
        for variant in manifest.runtimes:
            source = runtime_files[variant.file]
            with source.open("rb") as src, (staging / variant.file).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            if sha256_file(staging / variant.file) != variant.sha256:
                raise ArtifactIntegrityError(f"{variant.file} changed while it was being published")
        body = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
        _write_synced(staging / MANIFEST_FILE, body)  # the manifest last
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        os.rename(staging, target)  # atomic on one file system; fails if target appeared
        _fsync_dir(task_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("published artifact", extra={"task": task, "version": version})
    return verify_artifact(Path(model_dir), task, version)


def copy_artifact(source_dir: Path, model_dir: Path, task: str, version: str) -> ArtifactInfo:
    """Copy a verified version from another model directory (e.g. runs/candidate-models) into
    `model_dir`, byte for byte and atomically (staged in a hidden folder, manifest last, renamed).

    A version already in `model_dir` with the same model file is left as it is. Raises the
    errors of verify_artifact for the source, and ArtifactIntegrityError when `model_dir` holds
    the version with another model file.
    """
    source = verify_artifact(source_dir, task, version)
    task_dir = Path(model_dir) / task
    target = task_dir / version
    if target.exists() or target.is_symlink():
        existing = verify_artifact(model_dir, task, version)
        if existing.sha256 != source.sha256:
            raise ArtifactIntegrityError(f"{task} version {version} exists with another model")
        return existing
    task_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".copy-{version}-", dir=task_dir))
    try:
        runtime_files = [v.file for v in source.manifest.runtimes]
        for name in (MODEL_FILE, *runtime_files, MANIFEST_FILE):  # the manifest last
            with (source.path / name).open("rb") as src, (staging / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        os.rename(staging, target)
        _fsync_dir(task_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verify_artifact(model_dir, task, version)


def verify_artifact(model_dir: Path, task: str, version: str) -> ArtifactInfo:
    """Check one version folder and return its manifest.

    Raises InvalidVersionError for an unsafe name, ArtifactNotFoundError when the folder does not
    exist, ArtifactIntegrityError when it is a symlink or leaves the volume, its manifest is
    missing, unreadable or inconsistent, or the model file's sha256 does not match.
    """
    validate_task(task)
    validate_version(version)
    root = Path(model_dir).resolve()
    folder = Path(model_dir) / task / version
    if not folder.exists() and not folder.is_symlink():
        raise ArtifactNotFoundError(f"{task} version {version} does not exist")
    if folder.is_symlink() or not folder.is_dir():
        raise ArtifactIntegrityError(f"{task} version {version} is not a plain folder")
    if not folder.resolve().is_relative_to(root):
        raise ArtifactIntegrityError(f"{task} version {version} points outside the model volume")

    manifest_path = folder / MANIFEST_FILE
    model_path = folder / MODEL_FILE
    for path in (manifest_path, model_path):
        if path.is_symlink() or not path.is_file():
            raise ArtifactIntegrityError(f"{task} version {version} lacks {path.name}")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactIntegrityError(f"{task} version {version} has an oversized manifest")
    try:
        metadata = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactIntegrityError(f"{task} version {version} has a malformed manifest") from exc
    if not isinstance(metadata, dict):
        raise ArtifactIntegrityError(f"{task} version {version} has a malformed manifest")
    missing = [key for key in REQUIRED_FIELDS if key not in metadata]
    if missing:
        raise ArtifactIntegrityError(f"{task} version {version} manifest lacks {missing}")
    if metadata["schema_version"] != SCHEMA_VERSION:
        raise ArtifactIntegrityError(f"{task} version {version} has an unknown schema version")
    if metadata["task"] != task or metadata["version"] != version:
        raise ArtifactIntegrityError(f"{task} version {version} manifest names another artifact")
    if metadata["model_file"] != MODEL_FILE:
        raise ArtifactIntegrityError(f"{task} version {version} names an unexpected model file")
    if sha256_file(model_path) != metadata["sha256"]:
        raise ArtifactIntegrityError(f"{task} version {version} fails its checksum")
    _verify_runtime_files(folder, metadata, f"{task} version {version}")
    return ArtifactInfo(task=task, version=version, path=folder, metadata=metadata)


def _verify_runtime_files(folder: Path, metadata: Mapping[str, Any], what: str) -> None:
    """Each file the manifest's `runtimes` names must be a plain file with its sha256."""
    entries = metadata.get("runtimes", [])
    if not isinstance(entries, list):
        raise ArtifactIntegrityError(f"{what} has a malformed runtimes list")
    for entry in entries:
        name = entry.get("file") if isinstance(entry, dict) else None
        if name not in RUNTIME_FILE_NAMES:
            raise ArtifactIntegrityError(f"{what} names an unexpected runtime file")
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ArtifactIntegrityError(f"{what} lacks {name}")
        if sha256_file(path) != entry.get("sha256"):
            raise ArtifactIntegrityError(f"{what} fails the checksum of {name}")


def list_versions(model_dir: Path, task: str) -> list[str]:
    """Names of the candidate version folders of a task (unverified; hidden folders skipped)."""
    validate_task(task)
    task_dir = Path(model_dir) / task
    if not task_dir.is_dir():
        return []
    names = []
    for entry in task_dir.iterdir():
        if entry.name.startswith("."):
            continue  # staging folders of a publish in progress
        try:
            names.append(validate_version(entry.name))
        except InvalidVersionError:
            if (task, entry.name) not in _REPORTED_INVALID_NAMES:  # once per name, not per poll
                _REPORTED_INVALID_NAMES.add((task, entry.name))
                log.warning(
                    "ignoring a folder with an invalid version name",
                    extra={"task": task, "folder": ascii(entry.name)[:80]},
                )
    return sorted(names)


_REPORTED_INVALID_NAMES: set[tuple[str, str]] = set()


def resolve_artifact(model_dir: Path, task: str, pinned: str | None = None) -> ArtifactInfo:
    """The pinned version, or else the newest verified one (by manifest `created_at`, then name).

    Versions that fail verification are skipped with a warning. Raises ArtifactNotFoundError
    when no verified version exists, and the errors of verify_artifact for a bad pinned version.
    """
    if pinned:
        return verify_artifact(model_dir, task, pinned)
    verified = verified_artifacts(model_dir, task)
    if not verified:
        raise ArtifactNotFoundError(f"no verified {task} model in the model directory")
    return verified[0]


def verified_artifacts(model_dir: Path, task: str) -> list[ArtifactInfo]:
    """Every verified version of a task, newest first (by manifest `created_at`, then name).

    Versions that fail verification are skipped with a warning. Raises nothing else.
    """
    verified: list[ArtifactInfo] = []
    for version in list_versions(model_dir, task):
        try:
            verified.append(verify_artifact(model_dir, task, version))
        except (ArtifactIntegrityError, ArtifactNotFoundError) as exc:
            log.warning(
                "skipping unverifiable artifact",
                extra={"task": task, "version": version, "reason": exc.message},
            )
    return sorted(
        verified, key=lambda info: (str(info.metadata["created_at"]), info.version), reverse=True
    )
