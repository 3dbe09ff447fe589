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

ONNX Runtime sizes a session's thread pool when the session is made, so there is one session per
thread count the batcher uses (a lone request's and a batch's). Spinning is off: an idle intra-op
thread would otherwise busy-wait on the cores the HTTP work of the next requests needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shared.artifacts import RUNTIME_AGREEMENT_ATOL as AGREEMENT_ATOL

__all__ = ["AGREEMENT_ATOL", "OnnxForward", "onnxruntime_available"]

log = logging.getLogger(__name__)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxForward:
    """model.onnx in ONNX Runtime's CPU provider: one session per thread count."""

    def __init__(self, path: Path, thread_counts: Iterable[int]) -> None:
        import onnxruntime as ort

        data = Path(path).read_bytes()
        self.version = ort.__version__
        self._sessions = {}
        for threads in sorted(set(thread_counts)):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3  # errors only: its warnings go to stderr, not our logs
            self._sessions[threads] = ort.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
        first = next(iter(self._sessions.values()))
        self._input = first.get_inputs()[0].name

    def __call__(self, batch: np.ndarray, threads: int) -> np.ndarray | tuple[np.ndarray, ...]:
        """Outputs for a (N, C, H, W) float32 batch, with the session nearest `threads`."""
        session = self._sessions.get(threads) or self._sessions[min(self._sessions)]
        outputs = session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})
        outputs = [np.asarray(o, dtype=np.float32) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def disagreement(self, reference: Iterable[np.ndarray], batch: np.ndarray) -> float:
        """Largest absolute difference from `reference` (model.pt's outputs for `batch`)."""
        got = self(batch, min(self._sessions))
        got = got if isinstance(got, tuple) else (got,)
        reference = tuple(reference)
        if len(got) != len(reference):
            return float("inf")
        worst = 0.0
        for expected, actual in zip(reference, got, strict=True):
            if expected.shape != actual.shape:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(expected - actual), initial=0.0)))
        return worst
