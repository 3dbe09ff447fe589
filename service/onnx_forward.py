"""Forwards of an artifact's model.onnx in ONNX Runtime, beside its TorchScript model.pt.

An artifact may carry the same model exported to ONNX (`python -m training export-onnx`), with
the figures of both runtimes on the same images in its manifest (shared.artifacts.RuntimeVariant).
INFERENCE_RUNTIME picks what runs the forwards:

- `auto` (default): ONNX Runtime where the artifact carries a variant that holds (its figures
  within shared.artifacts.VALIDATION_BAR of TorchScript fp32's) and onnxruntime is installed;
  TorchScript otherwise.
- `torchscript`: always model.pt (fp32, or INFERENCE_PRECISION).
- `onnxruntime`: like `auto`, and a model that cannot run in ONNX Runtime is logged as a warning.

Before a session serves it must give model.pt's answers on two warm-up inputs (within
shared.artifacts.RUNTIME_AGREEMENT_ATOL of the logits); if it does not, or building it fails,
the TorchScript module serves (logged).

There is one session per thread count the batcher uses (a lone request's and a batch's;
shared.onnx_runtime), made at load. Spinning is off: an idle intra-op thread would otherwise
busy-wait on the cores the HTTP work of the next requests needs.
"""

from __future__ import annotations

from collections.abc import Iterable
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
