"""Load a verified artifact and run it as the service's load does, before anyone relies on it.

`python -m training promote` calls `check_loads` before it records a promotion, so a version
whose files pass their checksums but do not load (not TorchScript, a forward that fails, outputs
of other shapes than the manifest declares) is refused there instead of by every replica after
the operator believes it is live. The checks are those of service.registry.load_model: the
manifest's input must be one the service can feed, model.pt must load on the CPU and answer
two forwards of the declared input (TorchScript specialises its graph on the second) with the
declared output shapes. A model.onnx is loaded and compared with model.pt too, but its failure
only means the service runs TorchScript, so it is reported, not refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import ArtifactIntegrityError
from shared.store import ArtifactInfo
from shared.variants import RUNTIME_AGREEMENT_ATOL, RUNTIME_ONNX

WARMUP_FORWARDS = 2


@dataclass(frozen=True)
class WarmUp:
    """What loading found: the runtime the service would use and how long it took."""

    runtime: str  # "torchscript" or "onnxruntime"
    seconds: float
    onnx_note: str | None = None  # why model.onnx would not serve, when it is there


def _outputs(output: object) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple | list) else [output]  # type: ignore[list-item]


def check_loads(info: ArtifactInfo) -> WarmUp:
    """Load and warm up `info` as the service would. Raises ArtifactIntegrityError saying why
    it would not serve (ManifestError for an invalid manifest)."""
    started = time.perf_counter()
    manifest = info.manifest
    problems = manifest.input_problems()
    if problems:
        raise ArtifactIntegrityError("; ".join(problems))
    try:
        module = torch.jit.load(str(info.model_path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors, ...
        raise ArtifactIntegrityError("the model file is not a loadable TorchScript file") from exc
    module.eval()
    dummy = torch.zeros((1, *manifest.input.shape), dtype=torch.float32)
    expected = [[1, *shape] for shape in manifest.output.shapes]
    reference: list[torch.Tensor] = []
    for _ in range(WARMUP_FORWARDS):
        try:
            with torch.inference_mode():
                reference = _outputs(module(dummy))
        except Exception as exc:
            raise ArtifactIntegrityError("the warm-up forward failed") from exc
        shapes = [list(o.shape) if isinstance(o, torch.Tensor) else None for o in reference]
        if shapes != expected:
            raise ArtifactIntegrityError(
                f"the warm-up forward returned {shapes}, the manifest declares {expected}"
            )
    runtime, note = "torchscript", None
    variant = manifest.runtime(RUNTIME_ONNX)
    if variant is not None:
        if not variant.holds:
            note = "its model.onnx was not validated within the bar"
        else:
            try:
                from shared.onnx_runtime import OnnxSessions

                sessions = OnnxSessions(info.runtime_path(variant).read_bytes(), (1,))
                # model.pt's outputs come first; a graph may add its quality score after them
                got = sessions.run(dummy.numpy(), 1)[: len(reference)]
                worst = max(
                    float(np.abs(r.numpy() - g).max()) for r, g in zip(reference, got, strict=True)
                )
                if worst <= RUNTIME_AGREEMENT_ATOL:
                    runtime = RUNTIME_ONNX
                else:
                    note = f"its model.onnx disagrees with model.pt by {worst:.3g}"
            except Exception as exc:  # onnxruntime missing, a corrupt file, another graph
                note = f"its model.onnx does not load ({type(exc).__name__})"
    return WarmUp(runtime, time.perf_counter() - started, note)
