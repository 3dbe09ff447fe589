"""Forwards of an artifact's model.onnx in ONNX Runtime, beside its TorchScript model.pt.

An artifact may carry the same model exported to ONNX (`python -m training export-onnx`), with
the figures of both runtimes on the same images in its manifest (shared.variants.RuntimeVariant).
INFERENCE_RUNTIME picks what runs the forwards:

- `auto` (default): ONNX Runtime where the artifact carries a variant that holds (its figures
  within shared.variants.VALIDATION_BAR of TorchScript fp32's) and onnxruntime is installed;
  TorchScript otherwise.
- `torchscript`: always model.pt (fp32, or INFERENCE_PRECISION).
- `onnxruntime`: like `auto`, and a model that cannot run in ONNX Runtime is logged as a warning.

Before a session serves it must give model.pt's answers on two warm-up inputs (within
shared.variants.RUNTIME_AGREEMENT_ATOL of the logits); if it does not, or building it fails,
the TorchScript module serves (logged). model.pt's answers come from a short-lived process
(`torchscript_outputs`): a service that serves ONNX Runtime never imports torch, whose import
alone is hundreds of MiB resident.

There is one session per thread count the batcher uses (a lone request's and a batch's;
shared.onnx_runtime), made at load. Spinning is off: an idle intra-op thread would otherwise
busy-wait on the cores the HTTP work of the next requests needs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.onnx_runtime import OnnxSessions


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxForward(OnnxSessions):
    """model.onnx with a session for each of the batcher's thread counts, spinning off."""

    def __init__(self, path: Path, thread_counts: Iterable[int]) -> None:
        super().__init__(Path(path).read_bytes(), threads=thread_counts, spinning=False)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's output names, in the order a forward returns them."""
        session, _ = self.session(self.thread_counts[0])
        return tuple(o.name for o in session.get_outputs())

    def __call__(self, batch: np.ndarray, threads: int) -> np.ndarray | tuple[np.ndarray, ...]:
        """Outputs for a (N, C, H, W) float32 batch, like the TorchScript module's."""
        outputs = self.run(batch, threads)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def disagreement(self, reference: Iterable[np.ndarray], batch: np.ndarray) -> float:
        """Largest absolute difference from `reference` (model.pt's outputs for `batch`, or
        another graph's): this graph's first outputs are compared; it may add outputs after them
        (the quality score)."""
        got = self.run(batch, self.thread_counts[0])
        reference = tuple(reference)
        if len(got) < len(reference):
            return float("inf")
        got = got[: len(reference)]
        worst = 0.0
        for expected, actual in zip(reference, got, strict=True):
            if expected.shape != actual.shape:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(expected - actual), initial=0.0)))
        return worst


# Run by `torchscript_outputs` in a child process: model.pt's outputs for each saved batch.
_REFERENCE_SCRIPT = """
import sys
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[3]))
torch.set_flush_denormal(True)
module = torch.jit.load(sys.argv[1], map_location="cpu").eval()
batches = np.load(sys.argv[2])
out = {}
with torch.inference_mode():
    for i in range(len(batches.files)):
        o = module(torch.from_numpy(batches[f"b{i}"]))
        for j, t in enumerate(o if isinstance(o, (tuple, list)) else (o,)):
            out[f"b{i}_{j}"] = t.float().numpy()
np.savez(sys.argv[4], **out)
"""


def torchscript_outputs(
    model_path: Path, batches: Sequence[np.ndarray], threads: int, timeout_s: float = 300.0
) -> list[list[np.ndarray]]:
    """model.pt's float32 outputs for each batch, computed in a child process (torch is imported
    there, not here). Raises RuntimeError when the child fails or times out."""
    with tempfile.TemporaryDirectory(prefix="torchscript-reference-") as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inputs, **{f"b{i}": np.asarray(b, np.float32) for i, b in enumerate(batches)})
        argv = [sys.executable, "-c", _REFERENCE_SCRIPT, str(model_path), str(inputs),
                str(max(1, threads)), str(outputs)]  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"model.pt's reference forwards took over {timeout_s:g} s") from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise RuntimeError(f"model.pt's reference forwards failed: {last}")
        with np.load(outputs) as saved:
            return [
                [saved[f"b{i}_{j}"] for j in range(sum(k.startswith(f"b{i}_") for k in saved))]
                for i in range(len(batches))
            ]
