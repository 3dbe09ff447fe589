"""An ONNX model in ONNX Runtime's CPU provider, used by the service, the training jobs and the
precision bench alike.

ONNX Runtime sizes a session's intra-op thread pool when the session is made, so a caller that
varies its thread count (the service's batcher: a lone request's threads and a batch's; a timing
sweep over 1 and all threads) gets one session per count, made when first asked for. onnxruntime
is imported only here, and only when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


class OnnxSessions:
    """`model` (the bytes of an ONNX file) with one session per intra-op thread count.

    `threads` makes those sessions up front (a service pays at load, not at its first request).
    `spinning=False` stops idle intra-op threads busy-waiting between operators, which would take
    the cores other work of the process needs (the service's decoding and HTTP).
    """

    def __init__(self, model: bytes, threads: Iterable[int] = (), spinning: bool = True) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._model = model
        self._spinning = spinning
        self._sessions: dict[int, tuple[Any, str]] = {}
        self.version: str = ort.__version__
        for count in threads:
            self.session(count)

    @property
    def thread_counts(self) -> list[int]:
        return sorted(self._sessions)

    def session(self, threads: int) -> tuple[Any, str]:
        """(session, its input's name) with `threads` intra-op threads."""
        if threads not in self._sessions:
            ort = self._ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            if not self._spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3  # errors only: its warnings go to stderr
            session = ort.InferenceSession(self._model, options, providers=["CPUExecutionProvider"])
            self._sessions[threads] = (session, session.get_inputs()[0].name)
        return self._sessions[threads]

    def run(self, batch: np.ndarray, threads: int) -> list[np.ndarray]:
        """The model's float32 outputs for a (N, C, H, W) batch, on `threads` threads."""
        session, name = self.session(threads)
        outputs = session.run(None, {name: np.ascontiguousarray(batch, np.float32)})
        return [np.asarray(o, dtype=np.float32) for o in outputs]
