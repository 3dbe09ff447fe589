"""Response models: the typed JSON API, with the examples shown in the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Label = Literal["normal", "benign", "malignant"]
_MASK_EXAMPLE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
)
_REQUEST_ID = "5f0c6a8e2b9d4f1e8a7c3b2d1e0f9a8b"


class ModelRef(BaseModel):
    """The artifact that produced a result."""

    name: str = Field(examples=["efficientnet_lite0-cls"])
    version: str = Field(examples=["20250101T120000Z"])


class ImageInfo(BaseModel):
    """The image that was analysed (after decoding; for DICOM, one frame)."""

    format: Literal["png", "jpeg", "dicom"]
    width: int = Field(examples=[512])
    height: int = Field(examples=[384])
    frame: int = Field(0, description="Frame analysed (0 for single-frame images)")
    n_frames: int = Field(1, description="Frames in the file")


class BBox(BaseModel):
    """Bounding box of the lesion mask, in input-image pixels."""

    x: int
    y: int
    width: int
    height: int


class Quality(BaseModel):
    """Whether the image looks like the breast-ultrasound scans the models learnt from."""

    in_distribution: bool = Field(
        description="false: the image does not look like a breast-ultrasound scan of the kind "
        "the models were trained on; read every result on it as unreliable"
    )
    score: float = Field(
        ge=0,
        description="Distance of the image to the training scans (of the served model's "
        "features of it where its graphs compute the check, else of its statistics), in "
        "units of the flag threshold: above 1 is flagged",
        examples=[0.42],
    )
    reasons: list[str] = Field(
        description="Why the image was flagged (empty when in distribution)",
        examples=[[]],
    )


class DicomSource(BaseModel):
    """The DICOM instance and frame that were analysed, to match results with the source."""

    study_instance_uid: str | None = Field(
        description="Study Instance UID (0020,000D); null when the file has none",
        examples=["1.2.826.0.1.3680043.10.543.1"],
    )
    series_instance_uid: str | None = Field(
        description="Series Instance UID (0020,000E)", examples=["1.2.826.0.1.3680043.10.543.2"]
    )
    sop_instance_uid: str | None = Field(
        description="SOP Instance UID (0008,0018)", examples=["1.2.826.0.1.3680043.10.543.3"]
    )
    sop_class_uid: str | None = Field(
        description="SOP Class UID (0008,0016)", examples=["1.2.840.10008.5.1.4.1.1.3.1"]
    )
    frame: int = Field(
        description="The analysed frame, from 0 (as image.frame); its DICOM Referenced Frame "
        "Number is frame + 1"
    )


class CineFrame(BaseModel):
    """One frame of a ?frame=all analysis."""

    frame: int = Field(description="From 0")
    label: Label | None = Field(description="null where the endpoint does not classify (/segment)")
    probabilities: dict[str, float] | None = Field(
        description="Per class, as `probabilities` of a single-frame answer; null as `label`",
        examples=[{"normal": 0.08, "benign": 0.85, "malignant": 0.07}],
    )
    lesion_area_fraction: float | None = Field(
        ge=0,
        le=1,
        description="Lesion pixels / frame pixels; null where the frame was not segmented "
        "(/classify; /diagnose frames labelled normal)",
        examples=[0.042],
    )


class Cine(BaseModel):
    """With ?frame=all: every frame, and which one the rest of the answer describes."""

    frames: list[CineFrame] = Field(description="Every frame of the file, in order")
    largest_lesion_frame: int | None = Field(
        description="The frame with the largest lesion area (the earliest of equals); null when "
        "no frame has a lesion pixel"
    )
    key_frame: int = Field(
        description="The frame the rest of the answer (label, mask, image, source) describes: "
        "the largest lesion's frame, else the frame most likely a lesion (benign + malignant "
        "probability), else the first"
    )


class ClassificationResult(BaseModel):
    label: Label
    probabilities: dict[str, float] = Field(
        description="Per class; calibrated when `calibrated` is true (the artifact declares a "
        "calibration fitted on out-of-fold data), else the raw softmax",
        examples=[{"normal": 0.08, "benign": 0.85, "malignant": 0.07}],
    )
    calibrated: bool = Field(
        False, description="The probabilities went through the artifact's calibration"
    )
    uncertain: bool = Field(
        False,
        description="The top probability is below the uncertain threshold (UNCERTAIN_BELOW, "
        "else the artifact's own): the model cannot tell the classes apart well enough",
    )
    reliable: bool = Field(
        True,
        description="false when `uncertain` or the image is flagged out of distribution "
        "(quality.in_distribution false): the label is then not to be relied on",
    )
    model: ModelRef


class SegmentationResult(BaseModel):
    mask_png: str = Field(
        description="Base64 PNG, one channel, the input's width and height, 0 background / "
        "255 lesion",
        examples=[_MASK_EXAMPLE],
    )
    lesion_area_fraction: float = Field(ge=0, le=1, examples=[0.042])
    bbox: BBox | None = Field(description="null when no lesion pixel was found")
    model: ModelRef


class ClassifyResponse(ClassificationResult):
    image: ImageInfo
    quality: Quality
    source: DicomSource | None = Field(
        None, description="For a DICOM input, the instance and frame analysed; null for PNG / JPEG"
    )
    cine: Cine | None = Field(None, description="With ?frame=all: every frame; else null")
    request_id: str = Field(examples=[_REQUEST_ID])


class SegmentResponse(SegmentationResult):
    image: ImageInfo
    quality: Quality
    source: DicomSource | None = Field(
        None, description="For a DICOM input, the instance and frame analysed; null for PNG / JPEG"
    )
    cine: Cine | None = Field(None, description="With ?frame=all: every frame; else null")
    request_id: str = Field(examples=[_REQUEST_ID])


class DiagnoseResponse(BaseModel):
    classification: ClassificationResult
    segmentation: SegmentationResult | None = Field(
        description="Present when the finding is benign or malignant, else null"
    )
    image: ImageInfo
    quality: Quality
    image_png: str | None = Field(
        default=None,
        description="With ?include_image=true: the analysed frame as a base64 one-channel PNG "
        "of image.width x image.height (what the mask outlines); else null",
    )
    source: DicomSource | None = Field(
        None, description="For a DICOM input, the instance and frame analysed; null for PNG / JPEG"
    )
    cine: Cine | None = Field(None, description="With ?frame=all: every frame; else null")
    request_id: str = Field(examples=[_REQUEST_ID])


class ErrorDetail(BaseModel):
    code: str = Field(
        examples=["format_mismatch"],
        description="Machine-readable error code (the enum lists every one the service sends)",
    )
    message: str = Field(examples=["the body is a JPEG image but was declared as image/png"])
    request_id: str | None = Field(examples=[_REQUEST_ID])


class ErrorResponse(BaseModel):
    """The one error envelope of every endpoint."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "stalled", "shutting_down"] = Field(
        description="stalled: the models are loaded but inference has made no progress for "
        "READY_STALL_S (a request waited that long for a forward, or no worker thread freed up)"
    )
    models: dict[str, bool] = Field(
        description="Whether a model serves each task (the versions are in /models, with a key)",
        examples=[{"classification": True, "segmentation": False}],
    )


class CalibrationDescription(BaseModel):
    calibrated: bool = Field(description="The served probabilities are calibrated")
    method: Literal["none", "temperature", "vector"]
    temperature: float = Field(examples=[1.6])
    uncertain_below: float = Field(
        description="Top probability under which a classification is reported uncertain "
        "(the UNCERTAIN_BELOW setting, else the artifact's own value, else 0.5)",
        examples=[0.55],
    )


class ModelDescription(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    task: str
    name: str
    version: str
    sha256: str
    created_at: str
    architecture: str | None = None
    class_names: list[str] | None = None
    input: dict[str, Any]
    output: dict[str, Any]
    preprocessing: dict[str, Any]
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Evaluation metrics from the artifact's metadata"
    )
    calibration: CalibrationDescription | None = Field(
        None, description="How the class probabilities are calibrated (models with classes)"
    )
    intended_use: str | None = None
    runtime: Literal["torchscript", "onnxruntime"] = Field(
        "torchscript",
        description="What runs the forwards: torchscript (model.pt) or onnxruntime (the "
        "artifact's model.onnx, validated against model.pt; see INFERENCE_RUNTIME)",
    )


class ModelsResponse(BaseModel):
    models: dict[str, ModelDescription | None] = Field(
        description="Per task, the artifact serving it; null while none is loaded"
    )
    pins: dict[str, str | None] = Field(
        default_factory=dict, description="Pinned version per task (the *_VERSION settings)"
    )
    fallback: dict[str, str] = Field(
        default_factory=dict,
        description="Per task, the promoted (or pinned) version when it could not be served and "
        "the one promoted before it serves instead",
    )
    promoted: dict[str, str | None] = Field(
        default_factory=dict,
        description="Per task, the version last promoted (python -m training promote); null "
        "when none is",
    )
    gate: dict[str, float] = Field(
        default_factory=dict,
        description="The promotion gate's floors (GATE_MIN_ACCURACY, GATE_MIN_DICE, "
        "GATE_MIN_EVAL_IMAGES)",
        examples=[{"min_accuracy": 0.75, "min_dice": 0.7, "min_eval_images": 50}],
    )
    gate_refused: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Per task, promoted (or pinned) versions the gate refuses, and why",
    )


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry documenting error envelopes for the given statuses."""
    described = {
        400: "Empty body, corrupt image, or missing `file` part",
        401: "No API key, or one that is not valid (`unauthorized`)",
        403: "The API key lacks the scope this endpoint needs (`forbidden`)",
        404: "No such path (`not_found`)",
        405: "The path exists, not with this method (`method_not_allowed`)",
        406: "The Accept header names no media type this endpoint can produce",
        408: "The request body did not arrive within BODY_TIMEOUT_S (`request_timeout`)",
        413: "Body larger than MAX_BODY_BYTES",
        415: "Not a PNG, JPEG or DICOM, or the declared type disagrees with the bytes",
        422: "Decodable but unusable image (too many pixels, DICOM without pixels, bad frame), "
        "or invalid parameters",
        503: "A model is not loaded yet, or the service is shutting down",
    }
    return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}
