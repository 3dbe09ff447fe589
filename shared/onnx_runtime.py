"""An ONNX model in ONNX Runtime's CPU provider: the one wrapper the service, the training jobs,
the export's validation and the benches use.

ONNX Runtime sizes a session's intra-op thread pool when the session is made, so a caller that
varies its thread count (the service's batcher: a lone request's threads and a batch's; a timing
sweep over 1 and all threads) gets one session per count, made when first asked for. onnxruntime
is imported only here, and only when a model is loaded.

A graph is checked against model.pt before anything relies on it (`disagreement`). Where the
caller must not import torch (the service serving ONNX Runtime: torch's import alone is hundreds
of MiB resident), model.pt's answers come from the artifact's probe (shared.probe: recorded at
export) or, for an artifact without one, from a short-lived process (`torchscript_outputs`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.probe import largest_difference


def onnxruntime_available() -> bool:
    """Whether onnxruntime can be imported in this environment."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


_arena_lock = threading.Lock()
_arena_registered = False


def shared_arena(ort: Any) -> None:
    """Register, once per process, the CPU arena every arena-using session of this process
    allocates from (session.use_env_allocators). One arena instead of one per session: the graphs
    a service holds (model.onnx and classify.onnx, a shadow, the next version during a swap) run
    their forwards one at a time, so a shared arena's peak is the largest forward's rather than
    the sum of each session's largest."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # max memory: unbounded (0); extend strategy: next power of two (0), onnxruntime's
        # default; initial chunk and max dead bytes per chunk: its defaults (-1).
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))
        _arena_registered = True


class OnnxSessions:
    """`model` (an ONNX file's path, or its bytes) with one session per intra-op thread count and
    spinning.

    Given a path (`from_file`), every session reads the file itself and nothing keeps the file's
    bytes: holding them would keep a second copy of every weight resident for as long as the
    graph serves (143 MiB for the five-network ensemble's two graphs). A session made later, for a
    thread count not made up front, reads the file again.

    `threads` makes those sessions up front (a service pays at load, not at its first request).
    `spinning=False` stops idle intra-op threads busy-waiting between operators, which would take
    the cores other work of the process needs (the service's decoding and HTTP; a batch job's
    neighbours on a shared host). A caller may also ask for a spinning session per forward
    (`run(..., spinning=True)`): with `spin_us`, such a session's idle threads spin at most that
    many microseconds for the next operator before they sleep, and stop spinning when the forward
    ends (ONNX Runtime's session.intra_op.spin_duration_us, 1.26 and later, and
    session.force_spinning_stop); without it, onnxruntime's own spinning, which goes on for a
    while after a forward. With `arena` (the default) a forward's buffers stay in the process's
    one shared CPU arena for the next (`shared_arena`): it keeps the peak of the largest forward
    any session ran. `arena=False` frees each forward's buffers when it ends
    (SessionOptions.enable_cpu_mem_arena off). Raises
    ImportError when onnxruntime is not installed and onnxruntime's own errors for a file it
    cannot load.
    """

    def __init__(
        self,
        model: bytes | Path,
        threads: Iterable[int] = (),
        spinning: bool = True,
        spin_us: int | None = None,
        arena: bool = True,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._model: bytes | str = model if isinstance(model, bytes) else str(model)
        self._spinning = spinning
        self._spin_us = spin_us
        self._arena = arena
        self._sessions: dict[tuple[int, bool], tuple[Any, str]] = {}
        self.version: str = ort.__version__
        for count in threads:
            self.session(count)

    @classmethod
    def from_file(
        cls,
        path: Path,
        threads: Iterable[int] = (),
        spinning: bool = True,
        spin_us: int | None = None,
        arena: bool = True,
    ) -> OnnxSessions:
        """The ONNX file at `path`, read by each session as it is made. Raises OSError when
        it is not a readable file."""
        path = Path(path)
        with path.open("rb"):  # a clear OSError now rather than onnxruntime's at the first session
            pass
        return cls(path, threads, spinning, spin_us, arena)

    @property
    def thread_counts(self) -> list[int]:
        return sorted({threads for threads, _ in self._sessions})

    @property
    def default_threads(self) -> int:
        """The fewest threads a session was made for (1 when none was made yet)."""
        return self.thread_counts[0] if self._sessions else 1

    def session(self, threads: int, spinning: bool | None = None) -> tuple[Any, str]:
        """(session, its input's name) with `threads` intra-op threads, spinning or not (None:
        as the constructor's `spinning`)."""
        spins = self._spinning if spinning is None else spinning
        key = (threads, spins)
        if key not in self._sessions:
            ort = self._ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.enable_cpu_mem_arena = self._arena
            if self._arena:
                shared_arena(ort)
                options.add_session_config_entry("session.use_env_allocators", "1")
            if not spins:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            elif self._spin_us is not None:
                options.add_session_config_entry(
                    "session.intra_op.spin_duration_us", str(self._spin_us)
                )
                options.add_session_config_entry("session.force_spinning_stop", "1")
            options.log_severity_level = 3  # errors only: its warnings go to stderr
            session = ort.InferenceSession(self._model, options, providers=["CPUExecutionProvider"])
            self._sessions[key] = (session, session.get_inputs()[0].name)
        return self._sessions[key]

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's output names, in the order a forward returns them."""
        session, _ = self.session(self.default_threads)
        return tuple(o.name for o in session.get_outputs())

    def run(
        self, batch: np.ndarray, threads: int, spinning: bool | None = None
    ) -> list[np.ndarray]:
        """The model's float32 outputs for a (N, C, H, W) batch, on `threads` threads, spinning
        or not (None: as the constructor's `spinning`)."""
        session, name = self.session(threads, spinning)
        outputs = session.run(None, {name: np.ascontiguousarray(batch, np.float32)})
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def __call__(
        self, batch: np.ndarray, threads: int, spinning: bool | None = None
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Outputs for a (N, C, H, W) float32 batch, like the TorchScript module's: one array
        for a single output, else a tuple."""
        outputs = self.run(batch, threads, spinning)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def disagreement(
        self, reference: Iterable[np.ndarray], batch: np.ndarray, threads: int | None = None
    ) -> float:
        """Largest absolute difference from `reference` (model.pt's outputs for `batch`, or
        another graph's): this graph's first outputs are compared; it may add outputs after them
        (the quality score). inf when it gives fewer outputs or other shapes."""
        got = self.run(batch, threads or self.default_threads)
        return largest_difference(tuple(reference), got)


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
