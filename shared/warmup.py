"""Load a verified artifact and run it as the service's load does, before anyone relies on it.

`python -m training promote` calls `check_loads` before it records a promotion, so a version
whose files pass their checksums but do not load (not TorchScript, a forward that fails, outputs
of other shapes than the manifest declares) is refused there instead of by every replica after
the operator believes it is live. The checks are those of service.registry.load_model: the
manifest's input must be one the service can feed, model.pt must load on the CPU and answer
two forwards of the declared input (TorchScript specialises its graph on the second) with the
declared output shapes. A probe (shared.probe), which the service trusts in model.pt's place when
it checks model.onnx, must hold model.pt's answers to its inputs, or the version is refused. A
model.onnx is loaded and compared with model.pt too, but its failure only means the service runs
TorchScript, so it is reported, not refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from shared.errors import ArtifactIntegrityError
from shared.inference import load_module, onnx_graph, warm_up
from shared.probe import PROBE_FILE, largest_difference, read_probe
from shared.store import ArtifactInfo
from shared.variants import RUNTIME_AGREEMENT_ATOL, RUNTIME_ONNX


@dataclass(frozen=True)
class WarmUp:
    """What loading found: the runtime the service would use and how long it took."""

    runtime: str  # "torchscript" or "onnxruntime"
    seconds: float
    onnx_note: str | None = None  # why model.onnx would not serve, when it is there


def check_loads(info: ArtifactInfo) -> WarmUp:
    """Load and warm up `info` as the service would (shared.inference). Raises
    ArtifactIntegrityError saying why it would not serve (ManifestError for an invalid
    manifest)."""
    started = time.perf_counter()
    manifest = info.manifest
    problems = manifest.input_problems()
    if problems:
        raise ArtifactIntegrityError("; ".join(problems))
    module = load_module(info)
    reference = warm_up(module, manifest)
    if info.probe_path is not None:
        _check_probe(info, module)
    runtime, note = "torchscript", None
    variant = manifest.runtime(RUNTIME_ONNX)
    if variant is not None:
        if not variant.holds:
            note = "its model.onnx was not validated within the bar"
        else:
            try:
                sessions = onnx_graph(info, threads=(1,))
                assert sessions is not None  # the variant holds
                # model.pt's outputs come first; a graph may add its quality score after them
                dummy = np.zeros((1, *manifest.input.shape), np.float32)
                worst = sessions.disagreement(reference, dummy)
                if worst <= RUNTIME_AGREEMENT_ATOL:
                    runtime = RUNTIME_ONNX
                else:
                    note = f"its model.onnx disagrees with model.pt by {worst:.3g}"
            except Exception as exc:  # onnxruntime missing, a corrupt file, another graph
                note = f"its model.onnx does not load ({type(exc).__name__})"
    return WarmUp(runtime, time.perf_counter() - started, note)


def _check_probe(info: ArtifactInfo, module: object) -> None:
    """Raises ArtifactIntegrityError unless model.pt answers the probe's inputs as it records
    (within RUNTIME_AGREEMENT_ATOL: another torch build may reorder a sum)."""
    import torch

    assert info.probe_path is not None
    try:
        probe = read_probe(info.probe_path)
    except ValueError as exc:
        raise ArtifactIntegrityError(str(exc)) from exc
    worst = 0.0
    with torch.inference_mode():
        for batch, recorded in zip(probe.inputs, probe.outputs, strict=True):
            try:
                out = module(torch.from_numpy(batch))  # type: ignore[operator]
            except Exception as exc:
                raise ArtifactIntegrityError(
                    f"model.pt does not take the inputs of its {PROBE_FILE}"
                ) from exc
            out = out if isinstance(out, tuple | list) else (out,)
            answers = [t.float().numpy() for t in out]
            # model.pt's answers are the whole record: as many outputs, no more
            difference = largest_difference(recorded, answers)
            if len(answers) != len(recorded):
                difference = float("inf")
            worst = max(worst, difference)
    if not worst <= RUNTIME_AGREEMENT_ATOL:
        raise ArtifactIntegrityError(
            f"its {PROBE_FILE} does not hold model.pt's answers (off by {worst:.3g})"
        )
