"""One inference path: a verified artifact loaded in a runtime it ships, and frames in, findings
out. The service, the training jobs' evaluations, the export's validation, the comparisons and
the benches all run it, so every reported figure describes the code that serves.

    model = load_artifact(info, runtime="auto")  # model.onnx where it holds, else model.pt
    findings = predict(model, frames)            # one Findings per (H, W) uint8 frame

The steps, each written once: `model_input` (THE preprocessing, and where the frame went),
the forward (`module_forward` for model.pt or an eager network; shared.onnx_runtime for
model.onnx / classify.onnx), `split_outputs` (a forward's outputs by name), the class
probabilities after the manifest's calibration (`probabilities`) and `lesion_map` /
`lesion_mask` (the map brought back onto the frame's pixels, thresholded). `predict` runs them
in batches; the service runs the same steps with its batcher between them (service.predictors).

Loading: `load_module` (model.pt), `warm_up` (the forwards a loaded module answers before
anything relies on it, checked against the manifest), `onnx_graph` (a runtime file that holds),
`load_artifact` (the runtime the service would pick). torch is imported only where a TorchScript
or eager module runs: a process that runs ONNX Runtime never imports it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shared.calibration import Calibration
from shared.errors import ArtifactIntegrityError, ImageTooLargeError
from shared.labels import LESION_CLASSES
from shared.manifest import Manifest
from shared.onnx_runtime import OnnxSessions
from shared.postprocessing import sigmoid, softmax
from shared.preprocessing import Layout, Preprocessing
from shared.quality import FEATURE_QUALITY_OUTPUT
from shared.store import ArtifactInfo
from shared.variants import GRAPH_CLASSIFY, GRAPH_FULL, RUNTIME_ONNX

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUNTIME_TORCHSCRIPT = "torchscript"
RUNTIMES = ("auto", RUNTIME_TORCHSCRIPT, RUNTIME_ONNX)
WARMUP_FORWARDS = 2  # TorchScript's profiling executor specialises the graph on the 2nd call
OUTPUT_CLASSES, OUTPUT_MASKS, OUTPUT_QUALITY = "classes", "masks", FEATURE_QUALITY_OUTPUT
DEFAULT_BATCH = 16

Forward = Callable[[np.ndarray], Sequence[np.ndarray]]
"""A (N, C, S, S) float32 batch -> the model's float32 outputs, in their declared order."""


# --- loading ---------------------------------------------------------------------------------


def load_module(info: ArtifactInfo) -> torch.jit.ScriptModule:
    """The TorchScript module of a verified artifact, on the CPU, in eval mode (not warmed up:
    see `warm_up`).

    Raises ArtifactIntegrityError when the file is not a loadable TorchScript file.
    """
    import torch

    try:
        module = torch.jit.load(str(info.model_path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors, ...
        raise ArtifactIntegrityError("the model file is not a loadable TorchScript file") from exc
    return module.eval()


def check_output_shapes(shapes: list, expected: Sequence[Sequence[int]]) -> None:
    """Raises ArtifactIntegrityError when a warm-up forward's output shapes (with the batch axis)
    are not `expected`."""
    if shapes != [list(e) for e in expected]:
        got = shapes[0] if len(shapes) == 1 else shapes
        declared = list(expected[0]) if len(expected) == 1 else [list(e) for e in expected]
        raise ArtifactIntegrityError(
            f"the warm-up forward returned {got}, the manifest declares {declared}"
        )


def warm_up(
    module: Any, manifest: Manifest, lock: contextlib.AbstractContextManager | None = None
) -> list[np.ndarray]:
    """Run `module` on a batch of one zero input WARMUP_FORWARDS times (under `lock`, which
    serialises them with a service's forwards) and check each answer against the manifest's
    output shapes; the last answer's float32 outputs.

    Raises ArtifactIntegrityError when a forward fails or returns other shapes.
    """
    import torch

    dummy = torch.zeros((1, *manifest.input.shape), dtype=torch.float32)
    expected = [(1, *shape) for shape in manifest.output.shapes]
    outputs: list = []
    for _ in range(WARMUP_FORWARDS):
        try:
            with lock or contextlib.nullcontext(), torch.inference_mode():
                output = module(dummy)
        except Exception as exc:
            raise ArtifactIntegrityError("the warm-up forward failed") from exc
        outputs = list(output) if isinstance(output, tuple | list) else [output]
        check_output_shapes(
            [list(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in outputs],
            expected,
        )
    return [o.float().numpy() for o in outputs]


def module_outputs(module: Any, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    """One forward of a TorchScript or eager module (or any callable from a tensor to tensors)
    on a (N, C, S, S) batch, on the module's device, under inference mode: its float32 outputs
    on the CPU, as a tuple."""
    import torch

    parameters = getattr(module, "parameters", None)
    parameter = next(iter(parameters()), None) if callable(parameters) else None
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if parameter is not None and parameter.device.type != "cpu":
        x = x.to(parameter.device)
    with torch.inference_mode():
        output = module(x)
    outputs = output if isinstance(output, tuple | list) else (output,)
    return tuple(o.float().cpu().numpy() for o in outputs)


def module_forward(module: Any) -> Forward:
    """`module` (model.pt, or an eager network in eval mode) as a Forward."""
    return lambda batch: module_outputs(module, batch)


def onnx_forward(sessions: OnnxSessions, threads: int | None = None) -> Forward:
    """An ONNX graph as a Forward on `threads` intra-op threads (default: its first session's)."""
    return lambda batch: sessions.run(batch, threads or sessions.default_threads)


def onnx_graph(
    info: ArtifactInfo, graph: str = GRAPH_FULL, threads: Sequence[int] = (), spinning: bool = True
) -> OnnxSessions | None:
    """The artifact's ONNX file of `graph` in ONNX Runtime when the manifest carries one that
    holds (its figures within shared.variants.VALIDATION_BAR of TorchScript's); None otherwise.

    Raises ImportError when onnxruntime is missing, OSError or onnxruntime's errors when the
    file cannot be loaded.
    """
    variant = info.manifest.runtime(RUNTIME_ONNX, graph)
    if variant is None or not variant.holds:
        return None
    return OnnxSessions.from_file(info.runtime_path(variant), threads, spinning)


def declared_outputs(manifest: Manifest) -> tuple[str, ...]:
    """The names of model.pt's outputs in order: "classes" and/or "masks"."""
    output = manifest.output
    return tuple(
        name
        for name, part in ((OUTPUT_CLASSES, output.classes), (OUTPUT_MASKS, output.mask))
        if part is not None
    )


def graph_output_names(declared: Sequence[str], graph_names: Sequence[str]) -> tuple[str, ...]:
    """A runtime file's output names: model.pt's (`declared`) first, whatever the graph calls
    them, then the graph's own (the quality score)."""
    return tuple(declared) + tuple(graph_names[len(declared) :])


# --- what a model's outputs mean -------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What a model's input and outputs mean: THE preprocessing, the class names and their
    calibration, the mask's type and threshold, and the names of a forward's outputs."""

    preprocessing: Preprocessing
    class_names: tuple[str, ...] = ()
    calibration: Calibration = Calibration()
    mask_type: str | None = "logits"  # "logits" or "probability"; None: no mask output
    threshold: float = 0.5
    outputs: tuple[str, ...] = (OUTPUT_CLASSES, OUTPUT_MASKS)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelSpec:
        """The spec of an artifact's model.pt (a runtime file may add outputs after its own:
        `graph_output_names`)."""
        output = manifest.output
        return cls(
            preprocessing=manifest.preprocessing,
            class_names=manifest.class_names if output.classes else (),
            calibration=output.classes.calibration if output.classes else Calibration(),
            mask_type=output.mask.type if output.mask else None,
            threshold=output.mask.threshold if output.mask else 0.5,
            outputs=declared_outputs(manifest),
        )


@dataclass(frozen=True)
class InferenceModel:
    """A forward and what its outputs mean; `runtime` says what runs it."""

    forward: Forward
    spec: ModelSpec
    runtime: str = RUNTIME_TORCHSCRIPT


@dataclass(frozen=True)
class Findings:
    """What a model says about one frame, mapped back onto the frame's pixels."""

    layout: Layout  # where the frame went in the model's input
    logits: np.ndarray | None = None  # (K,) float64 class logits as the forward gave them
    probabilities: np.ndarray | None = None  # (K,) float64, after the model's calibration
    lesion_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32
    mask: np.ndarray | None = field(default=None, repr=False)  # (H, W) uint8 0 / 255
    quality: float | None = None  # the forward's quality score, where its graph computes one

    def label(self, class_names: Sequence[str]) -> str | None:
        """The most likely class (the first of equals); None without class outputs."""
        if self.probabilities is None:
            return None
        return class_names[int(np.argmax(self.probabilities))]


def model_input(
    preprocessing: Preprocessing, pixels: np.ndarray, max_aspect_ratio: float | None = None
) -> tuple[np.ndarray, Layout]:
    """A (H, W) uint8 frame -> the (C, S, S) float32 input and where the frame went.

    With `max_aspect_ratio`, raises ImageTooLargeError for a frame whose content (after
    trim_border) is more than that many times longer than wide.
    """
    layout = preprocessing.layout(pixels)
    longest = max_aspect_ratio * preprocessing.resize if max_aspect_ratio is not None else None
    if longest is not None and max(layout.resized) > longest:
        # trim_border can leave a thin strip of a frame that passed the decoder's aspect cap;
        # scaling its shorter side up would cost memory without bound.
        raise ImageTooLargeError(
            f"The image's content is more than {max_aspect_ratio:g} times longer than "
            "it is wide; it was not analysed."
        )
    resized = preprocessing.resize_image(pixels, layout)
    return preprocessing.normalise(resized), layout


def model_inputs(
    preprocessing: Preprocessing, frames: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[Layout]]:
    """(N, C, S, S) float32 batch of `frames` and where each went."""
    inputs = [model_input(preprocessing, pixels) for pixels in frames]
    return np.stack([x for x, _ in inputs]), [layout for _, layout in inputs]


@dataclass(frozen=True)
class Outputs:
    """A forward's outputs by name; None for what its graph does not give."""

    classes: np.ndarray | None  # (N, K) class logits
    masks: np.ndarray | None  # (N, S, S) lesion maps (logits or probability)
    quality: np.ndarray | None  # (N,) quality scores


def split_outputs(names: Sequence[str], output: Any) -> Outputs:
    """A forward's outputs (one array, or a sequence in the order of `names`) by name."""
    arrays = tuple(output) if isinstance(output, tuple | list) else (output,)
    named = dict(zip(names, arrays, strict=True))
    masks = named.get(OUTPUT_MASKS)
    return Outputs(
        named.get(OUTPUT_CLASSES), None if masks is None else masks[:, 0], named.get(OUTPUT_QUALITY)
    )


def probabilities(logits: np.ndarray, calibration: Calibration | None = None) -> np.ndarray:
    """One frame's (K,) class logits -> (K,) float64 probabilities after `calibration`."""
    return softmax((calibration or Calibration()).apply(logits))


def lesion_map(
    row: np.ndarray, layout: Layout, preprocessing: Preprocessing, mask_type: str | None = "logits"
) -> np.ndarray:
    """A model-sized (S, S) lesion map -> the frame's (H, W) float32 lesion probability. The
    map is a probability when `mask_type` is "probability", else logits."""
    probability = row if mask_type == "probability" else sigmoid(row)
    return preprocessing.frame_map(probability.astype(np.float32), layout)


def lesion_mask(frame_map: np.ndarray, threshold: float) -> np.ndarray:
    """The frame-sized (H, W) uint8 mask: 255 where the lesion probability exceeds `threshold`."""
    return np.where(frame_map > threshold, np.uint8(255), np.uint8(0))  # no int64 copy


def findings_of(
    spec: ModelSpec,
    outputs: Outputs,
    layouts: Sequence[Layout],
    segment: Literal["always", "lesion"] = "always",
) -> list[Findings]:
    """One forward's outputs -> one Findings per frame. With `segment="lesion"` (as /diagnose
    answers) a frame the model labels neither benign nor malignant gets no map and no mask."""
    found = []
    for j, layout in enumerate(layouts):
        logits = probs = frame = mask = None
        if outputs.classes is not None:
            logits = np.asarray(outputs.classes[j], dtype=np.float64)
            probs = probabilities(outputs.classes[j], spec.calibration)
        lesion = (
            segment == "always"
            or probs is None
            or spec.class_names[int(np.argmax(probs))] in LESION_CLASSES
        )
        if outputs.masks is not None and lesion:
            frame = lesion_map(outputs.masks[j], layout, spec.preprocessing, spec.mask_type)
            mask = lesion_mask(frame, spec.threshold)
        quality = None if outputs.quality is None else float(outputs.quality[j])
        found.append(Findings(layout, logits, probs, frame, mask, quality))
    return found


def predict(
    model: InferenceModel,
    frames: Sequence[np.ndarray],
    batch_size: int = DEFAULT_BATCH,
    segment: Literal["always", "lesion"] = "always",
) -> list[Findings]:
    """Findings for (H, W) uint8 frames, `batch_size` frames per forward, as the service answers
    them (THE preprocessing, the forward, the calibration, the frame map and the threshold).

    `segment="lesion"`: only frames labelled a lesion get a map and mask (/diagnose).
    """
    found: list[Findings] = []
    for start in range(0, len(frames), batch_size):
        batch, layouts = model_inputs(model.spec.preprocessing, frames[start : start + batch_size])
        outputs = split_outputs(model.spec.outputs, model.forward(batch))
        found += findings_of(model.spec, outputs, layouts, segment)
    return found


def load_artifact(
    info: ArtifactInfo, runtime: str = "auto", threads: int = 1, graph: str = GRAPH_FULL
) -> InferenceModel:
    """The artifact's `graph` in the runtime the service would run it in: with "auto" or
    "onnxruntime", its ONNX file where the manifest carries one that holds and onnxruntime is
    installed (no spinning: a batch job on a shared host should not busy-wait between forwards);
    model.pt otherwise. The classify-only graph exists only as ONNX.

    Raises ArtifactIntegrityError when model.pt is not loadable, ValueError for an unknown
    runtime or a graph the artifact does not carry in a runtime it can run.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}")
    manifest = info.manifest
    spec = ModelSpec.from_manifest(manifest)
    if runtime != RUNTIME_TORCHSCRIPT:
        try:
            sessions = onnx_graph(info, graph, (threads,), spinning=False)
        except ImportError:
            sessions = None
            if manifest.runtime(RUNTIME_ONNX, graph) is not None:
                log.warning("onnxruntime is not installed: %s version %s runs model.pt",
                            info.task, info.version)  # fmt: skip
        if sessions is not None:
            declared = (OUTPUT_CLASSES,) if graph == GRAPH_CLASSIFY else spec.outputs
            outputs = graph_output_names(declared, sessions.output_names)
            return InferenceModel(
                onnx_forward(sessions, threads), replace(spec, outputs=outputs), RUNTIME_ONNX
            )
    if graph != GRAPH_FULL:
        raise ValueError(f"{info.task} version {info.version} carries no {graph} graph it can run")
    return InferenceModel(module_forward(load_module(info)), spec, RUNTIME_TORCHSCRIPT)
