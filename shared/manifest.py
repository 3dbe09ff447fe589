"""The artifact manifest (metadata.json): its schema and its validation.

The manifest is one typed object, `Manifest`: training builds the dict, `publish_artifact`
(shared.store) validates it with `Manifest.from_dict` (an invalid one is never written) and
writes `Manifest.to_dict()`; the service reads `ArtifactInfo.manifest` at load time. Schema
version 1 is the only one; fields added since (`status`, `runtimes`) are optional, so every
version-1 manifest ever written still reads, and an older reader ignores them. The runtime
variants it lists are shared.variants', its headline figures shared.headline_figures'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from shared.calibration import Calibration
from shared.errors import ArtifactIntegrityError, InvalidVersionError
from shared.headline_figures import HeadlineFigures, read_headline_figures
from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_SEGMENTATION, TASKS
from shared.preprocessing import Preprocessing
from shared.variants import GRAPH_FULL, RuntimeVariant, read_runtime_variants

MODEL_FILE = "model.pt"
SCHEMA_VERSION = 1
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


STATUS_CANDIDATE = "candidate"
STATUS_SMOKE = "smoke"
STATUSES = (STATUS_CANDIDATE, STATUS_SMOKE)
"""`status` of a published artifact: a smoke run (never served) or a candidate (served once
promoted and past the gate; see shared.promotion). Promotion itself is not in the manifest,
which never changes after publishing, but in the model directory's promotions record."""

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
    def headline_figures(self) -> HeadlineFigures:
        """The headline figures of `metrics` (see HeadlineFigures)."""
        return read_headline_figures(self.metrics, [])

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
        read_headline_figures(sections["metrics"], problems)
        status = data.get("status", STATUS_SMOKE if training.smoke else STATUS_CANDIDATE)
        if status not in STATUSES:
            problems.append(f"status must be one of {list(STATUSES)}")
        elif training.smoke and status != STATUS_SMOKE:
            problems.append("status must be 'smoke' for a smoke run (training.smoke)")

        runtimes = read_runtime_variants(data["runtimes"], problems) if "runtimes" in data else ()

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
