"""Export a trained model to TorchScript and publish it as a versioned artifact.

    scripted = export_torchscript(model, example)          # checked equal to eager, or raises
    metadata = build_metadata(task=..., name=..., ...)     # fields of shared.manifest.Manifest
    info = publish(model_dir, task, version, scripted, metadata)   # validated, then written

The service loads only what `publish` writes, so the check that the scripted model equals the
eager one is made on the serialised bytes (saved, reloaded, compared), not on the in-memory object.
"""

from __future__ import annotations

import io
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.labels import TASK_CLASSIFICATION, TASKS
from shared.preprocessing import Preprocessing
from shared.store import ArtifactInfo, publish_artifact

log = logging.getLogger(__name__)

INTENDED_USE = (
    "Research use only; not a medical device; not for diagnosis or treatment decisions. "
    "Trained on the public BUSI breast-ultrasound data set (one site, 2018); performance on "
    "other scanners, sites or populations is unknown."
)


class ExportMismatchError(RuntimeError):
    """The exported TorchScript model does not reproduce the eager model's outputs."""


def _outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [result[k] for k in sorted(result)]
    return list(result)


def export_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    *,
    n_random: int = 3,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    seed: int = 0,
) -> torch.jit.ScriptModule:
    """TorchScript of `model` (in eval mode), checked equal to the eager model.

    Tries torch.jit.script first (keeps control flow) and falls back to torch.jit.trace on
    `example`. The result is saved to bytes and reloaded, then compared with the eager model
    with torch.testing.assert_close on `example`, on `n_random` random inputs of its shape and on
    a batch of a different size. Raises ExportMismatchError if any output differs.
    """
    model = model.eval()
    try:
        scripted = torch.jit.script(model)
        how = "script"
    except Exception as exc:  # scripting fails on dynamic Python; tracing is the fallback
        log.info("torch.jit.script failed (%s); tracing instead", type(exc).__name__)
        with torch.inference_mode(False), torch.no_grad():
            scripted = torch.jit.trace(model, example)
        how = "trace"
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location="cpu").eval()

    generator = torch.Generator().manual_seed(seed)
    inputs = [example]
    inputs += [torch.randn(example.shape, generator=generator) for _ in range(n_random)]
    other_batch = 2 if example.shape[0] != 2 else 3
    inputs.append(torch.randn((other_batch, *example.shape[1:]), generator=generator))
    with torch.no_grad():
        for x in inputs:
            expected, actual = _outputs(model(x)), _outputs(loaded(x))
            try:
                torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
            except AssertionError as exc:
                raise ExportMismatchError(f"TorchScript ({how}) differs from eager: {exc}") from exc
    log.info("exported TorchScript via %s; equal to eager on %d inputs", how, len(inputs))
    return loaded


def framework_versions() -> dict[str, str]:
    import torchvision

    versions = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def build_metadata(
    *,
    task: str,
    name: str,
    architecture: str,
    preprocessing: Preprocessing,
    output: dict[str, Any],
    metrics: dict[str, Any],
    training: dict[str, Any],
    data_fingerprint: dict[str, Any],
    class_names: tuple[str, ...] | list[str] | None = None,
    input_channels: int | None = None,
    intended_use: str = INTENDED_USE,
) -> dict[str, Any]:
    """The manifest fields a training job supplies (shared.manifest.Manifest; publish fills in
    the rest and validates the whole).

    `output` is {"type": "logits", "shape": [K]} for a classifier and {"type": "logits",
    "shape": [1, H, W], "threshold": t} for a segmenter. `input_channels` defaults to the
    preprocessing's channels (pass 4 for a model that also takes a mask channel). Raises
    ValueError for an unknown task or a classifier without class names.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == TASK_CLASSIFICATION and not class_names:
        raise ValueError("a classifier's metadata needs class_names")
    size = preprocessing.output_size
    metadata: dict[str, Any] = {
        "task": task,
        "name": name,
        "architecture": architecture,
        "preprocessing": preprocessing.to_metadata(),
        "input": {
            "channels": input_channels or preprocessing.channels,
            "height": size,
            "width": size,
            "dtype": "float32",
            "value_range": "(x / 255 - mean) / std per channel, x in [0, 255]",
            "source": "8-bit grayscale (shared.decoding)",
        },
        "output": output,
        "metrics": metrics,
        "training": training,
        "data_fingerprint": data_fingerprint,
        "framework": framework_versions(),
        "intended_use": intended_use,
    }
    if class_names:
        metadata["class_names"] = list(class_names)
    return metadata


def publish(
    model_dir: Path,
    task: str,
    version: str,
    scripted: torch.jit.ScriptModule,
    metadata: dict[str, Any],
) -> ArtifactInfo:
    """Save `scripted` to a temp file; publish it atomically as `<model_dir>/<task>/<version>`.

    Raises the errors of shared.store.publish_artifact: InvalidVersionError for a bad name,
    ManifestError naming every missing or invalid manifest field (nothing is written then), and
    ArtifactIntegrityError for an existing version.
    """
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        model_file = Path(tmp) / "model.pt"
        torch.jit.save(scripted, str(model_file))
        info = publish_artifact(Path(model_dir), task, version, model_file, metadata)
    log.info("published %s %s to %s", task, version, info.path)
    return info
