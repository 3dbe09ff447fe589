"""Adaptive micro-batching of forwards, with a bounded queue and per-request deadlines.

Requests are decoded and preprocessed concurrently on the worker threads; their forwards go
through one `Batcher`, whose single forward thread runs one batch at a time. A batch holds only
requests for the same model (a batcher per model, sharing one thread: forwards of all models
share the cores, as the one inference lock made them before). Nothing waits for a batch to
fill: a lone request starts its forward at once, with every torch thread; requests that arrive
while a forward runs are grouped into the next one, up to MAX_BATCH_SIZE, and run with
TORCH_THREADS_BATCHED threads (default: all; fewer leaves cores to the HTTP work behind them).
Only when the previous forward was already a batch (the service is under load) does the thread
wait up to MAX_BATCH_WAIT_MS for more requests to join.

When MAX_QUEUE requests already wait, a new one is refused at once (ServiceOverloadedError, 503
with Retry-After) instead of letting latency grow without bound; a request whose deadline
(REQUEST_DEADLINE_MS after the predictor began it, its body received) passes before its forward
starts gets DeadlineExceededError (504) and its forward is skipped.

A model whose validated model.onnx runs in ONNX Runtime (shared.onnx_runtime, INFERENCE_RUNTIME)
is called through its sessions, one per thread count. A TorchScript model can be prepared for
serving on the forward thread when it is idle: frozen and
optimised for inference (torch.jit.freeze + optimize_for_inference, the same fp32 arithmetic with
the convolutions prepacked for oneDNN) and/or run under bf16 autocast. A prepared module is used
only once it has been checked against the plain one on a warm-up input; until then, and if the
check fails, the plain module serves.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from service.metrics import ServiceMetrics
from shared.errors import DeadlineExceededError, ServiceOverloadedError
from shared.inference import module_outputs

if TYPE_CHECKING:  # imported where a TorchScript module runs: ONNX Runtime serves without it
    import torch

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]

# perf_counter() at which the predictor began a request (its body received); the deadline counts
# from there. Unset (a forward outside a request): from the forward's submission.
request_started: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "request_started", default=None
)
# (seconds queued, rows in its forward) of the calling context's last forward, for its trace span
last_forward: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar(
    "last_forward", default=(0.0, 0)
)

# A prepared module must give the plain module's answers: exact up to float reassociation for
# a frozen fp32 graph; bf16 carries 8 bits of mantissa, so its logits differ by ~1e-2 (its
# accuracy is what bench/precision.py validates; this only catches a broken conversion).
_CHECK_ATOL = {"fp32": 1e-3, "bf16": 0.5}
_IDLE_POLL_S = 0.5  # how often an idle forward thread looks for models to prepare


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 4
    max_wait_s: float = 0.0
    max_queue: int = 16
    deadline_s: float | None = None
    threads_alone: int = 1  # a forward of one request
    threads_batched: int = 1  # a forward of two or more
    precision: Precision = "fp32"
    freeze: bool = False
    spin_us: int = 0  # ONNX Runtime: a lone forward's idle threads spin this long (0: never)
    onnx_arena: bool = True  # ONNX Runtime: keep a session's buffers between forwards


class InFlight:
    """How many requests are being analysed now (decoded, preprocessed, forwarded,
    postprocessed): `with in_flight:` around each."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count


@dataclass(eq=False)
class _Pending:
    model: Any  # service.registry.LoadedModel (not imported: registry imports this module)
    batch: np.ndarray
    enqueued: float
    deadline: float | None
    graph: str = "full"  # which of the model's graphs (LoadedModel.graphs) runs it
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    taken: bool = False  # in a forward: it can no longer be withdrawn
    queue_wait: float = 0.0  # seconds from enqueued to its forward's start
    rows: int = 0  # rows of the forward it was in


@dataclass
class _Prepared:
    plain: torch.jit.ScriptModule  # kept so that the id() key cannot be reused
    module: torch.jit.ScriptModule | None  # None: preparation failed, the plain one serves


class Batcher:
    """Groups waiting forwards per model into batches run on one forward thread."""

    def __init__(
        self,
        config: BatchingConfig,
        metrics: ServiceMetrics,
        lock: threading.Lock,
        served_models: Callable[[], Iterable[Any]] = tuple,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.lock = lock  # serialises the forwards with model warm-ups
        self.served_models = served_models
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_batch = 0
        self._threads_now = 0
        self._prepared: dict[int, _Prepared] = {}
        self._forward_started: float | None = None  # perf_counter() of the running forward
        self.in_flight = InFlight()  # the predictor counts the requests it analyses here

    def stalled_s(self) -> float:
        """Seconds the oldest waiting request has waited, or the running forward has run, the
        longer; 0 when idle. Lock-free, for /readyz: it must answer while a forward hangs."""
        now = time.perf_counter()
        started = self._forward_started
        try:
            oldest = self._queue[0].enqueued
        except IndexError:
            oldest = None
        times = [now - t for t in (started, oldest) if t is not None]
        return max(times, default=0.0)

    # --- the request side ----------------------------------------------------------------------

    def submit(
        self, model: Any, batch: np.ndarray, graph: str = "full"
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run `model`'s `graph` on `batch` (N, C, H, W) in the next forward of that model and
        graph; block until done.

        Raises ServiceOverloadedError when MAX_QUEUE forwards already wait, DeadlineExceededError
        when the request's deadline passes before its forward starts, or what the forward raised.
        """
        now = time.perf_counter()
        deadline = self._deadline_of_this_request()
        if deadline is not None and now >= deadline:
            self._reject("deadline")
        pending = _Pending(model, batch, now, deadline, graph)
        with self._cond:
            if len(self._queue) >= self.config.max_queue:
                self._reject("queue_full")
            self._queue.append(pending)
            self.metrics.inference_queue.set(len(self._queue))
            self._ensure_thread()
            self._cond.notify()
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        if not pending.done.wait(timeout):
            with self._cond:
                if not pending.taken:  # still queued: withdraw it, its forward never runs
                    self._queue.remove(pending)
                    self.metrics.inference_queue.set(len(self._queue))
                    self._reject("deadline")
            pending.done.wait()  # its forward already runs: the answer is moments away
        if pending.error is not None:
            raise pending.error
        last_forward.set((pending.queue_wait, pending.rows))
        return pending.result

    def _deadline_of_this_request(self) -> float | None:
        if self.config.deadline_s is None:
            return None
        started = request_started.get()
        return (started if started is not None else time.perf_counter()) + self.config.deadline_s

    def _reject(self, reason: str) -> None:
        self.metrics.inference_rejected.labels(reason).inc()
        if reason == "queue_full":
            raise ServiceOverloadedError(
                "The service is at capacity; retry after the time in the Retry-After header."
            )
        raise DeadlineExceededError(
            "The request could not be analysed within the service's deadline; retry later."
        )

    # --- the forward thread --------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="forward", daemon=True)
            self._thread.start()

    def start(self) -> None:
        """Start the forward thread now (it also starts at the first request)."""
        with self._cond:
            self._ensure_thread()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    if not self._cond.wait(_IDLE_POLL_S):
                        break  # idle: look for models to prepare, outside the condition
                if self._stopping and not self._queue:
                    return
                batch = self._take_batch() if self._queue else []
            if not batch:
                self.prepare_served_models()
                continue
            self._forward(batch)

    def _take_batch(self) -> list[_Pending]:
        """Under the condition: the oldest waiting request and the others for its model and
        graph."""
        config = self.config
        head = self._queue[0]
        if config.max_wait_s > 0 and self._last_batch > 1:
            # Under load: give the requests being preprocessed a moment to join this batch.
            until = time.perf_counter() + config.max_wait_s
            while self._count_for(head) < config.max_batch_size and not self._stopping:
                left = until - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
        now = time.perf_counter()
        taken: list[_Pending] = []
        rows = 0
        for pending in list(self._queue):
            if pending.model is not head.model or pending.graph != head.graph:
                continue
            if pending.deadline is not None and now >= pending.deadline:
                continue  # its own thread withdraws it with a 504
            if taken and rows + len(pending.batch) > config.max_batch_size:
                break
            self._queue.remove(pending)
            pending.taken = True
            taken.append(pending)
            rows += len(pending.batch)
        self.metrics.inference_queue.set(len(self._queue))
        return taken

    def _count_for(self, head: _Pending) -> int:
        return sum(
            len(p.batch) for p in self._queue if p.model is head.model and p.graph == head.graph
        )

    def _forward(self, batch: list[_Pending]) -> None:
        model = batch[0].model
        task = model.task
        started = time.perf_counter()
        rows = sum(len(p.batch) for p in batch)
        for pending in batch:
            self.metrics.queue_wait.labels(task).observe(started - pending.enqueued)
            pending.queue_wait, pending.rows = started - pending.enqueued, rows
        self.metrics.batch_size.labels(task).observe(rows)
        self._last_batch = rows
        self._forward_started = started
        try:
            config = self.config
            threads = config.threads_alone if rows == 1 else config.threads_batched
            inputs = np.concatenate([p.batch for p in batch]) if len(batch) > 1 else batch[0].batch
            if model.runner(batch[0].graph) is None:
                self._set_threads(threads)  # torch's pool, sized on this thread
            outputs = self.run(model, inputs, batch[0].graph, threads, self._may_spin(rows))
        except BaseException as exc:  # every waiting request gets the forward's error
            self._forward_started = None
            for pending in batch:
                pending.error = exc
                pending.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        self._forward_started = None
        start = 0
        for pending in batch:
            stop = start + len(pending.batch)
            if isinstance(outputs, tuple):
                pending.result = tuple(o[start:stop] for o in outputs)
            else:
                pending.result = outputs[start:stop]
            start = stop
            pending.done.set()

    def _may_spin(self, rows: int) -> bool:
        """Whether a forward of `rows` rows may keep ONNX Runtime's idle threads spinning
        between its operators: only a lone request's, while no other request is being analysed.
        Then nothing else in the process needs the cores, and an idle thread that sleeps
        between operators (tens of times a forward) costs a wake-up each time; beside other
        work, a spinning thread takes the core that work needs, and waits spinning for a peer
        thread the OS has descheduled."""
        return self.config.spin_us > 0 and rows == 1 and self.in_flight.count <= 1

    def run(
        self, model: Any, inputs: np.ndarray, graph: str, threads: int, spinning: bool = False
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """One forward of `model`'s `graph` on `inputs` under the forwards' lock, now, on the
        calling thread: model.onnx / classify.onnx in ONNX Runtime on `threads` threads (their
        session that spins between operators with `spinning`), else the (prepared) TorchScript
        module on the calling thread's torch threads."""
        runner = model.runner(graph)
        with self.lock:
            if runner is not None:
                return runner(inputs, threads, spinning)
            return self.run_module(self._module_for(model), inputs)

    def run_module(
        self, module: torch.jit.ScriptModule, inputs: np.ndarray
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """One forward at the configured precision (shared.inference); float32 numpy outputs."""
        import torch

        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.config.precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            outputs = module_outputs(module, inputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def _set_threads(self, threads: int) -> None:
        # torch's intra-op pool is sized per calling thread (OpenMP): set it on this one.
        if threads != self._threads_now:
            import torch

            torch.set_num_threads(threads)
            self._threads_now = threads

    # --- preparing models ----------------------------------------------------------------------

    def _module_for(self, model: Any) -> torch.jit.ScriptModule:
        prepared = self._prepared.get(id(model.module))
        if prepared is None or prepared.module is None:
            return model.module
        return prepared.module

    def prepare_served_models(self) -> None:
        """Prepare every served model not prepared yet; forget replaced ones."""
        if not self.config.freeze and self.config.precision == "fp32":
            return
        served = list(self.served_models())
        keep = {id(m.module) for m in served}
        for key in [k for k in self._prepared if k not in keep]:
            del self._prepared[key]  # a replaced version: let its prepared copy go
        for model in served:
            if model.onnx is None and id(model.module) not in self._prepared:
                self.prepare(model)

    def prepare(self, model: Any) -> None:
        """Freeze / check `model` for the configured precision (on the calling thread)."""
        import torch

        started = time.perf_counter()
        module = model.module
        try:
            candidate = module
            if self.config.freeze:
                with self.lock:
                    candidate = torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))
            example = example_input(model.input_shape)
            with self.lock:
                reference = module_outputs(module, example)
            for _ in range(2):  # the profiling executor specialises on the second call
                with self.lock:
                    got = self.run_module(candidate, example)
            got = got if isinstance(got, tuple) else (got,)
            atol = _CHECK_ATOL[self.config.precision]
            for expected, actual in zip(reference, got, strict=True):
                if not np.allclose(expected, actual, atol=atol, rtol=0):
                    raise ValueError("the prepared module disagrees with the plain one")
        except Exception:
            log.exception(
                "could not prepare %s version %s (freeze=%s, precision=%s); it serves as loaded",
                model.task, model.version, self.config.freeze, self.config.precision,
                extra={"task": model.task, "version": model.version},
            )  # fmt: skip
            self._prepared[id(module)] = _Prepared(module, None)
            return
        self._prepared[id(module)] = _Prepared(module, candidate)
        log.info(
            "prepared %s version %s for serving (freeze=%s, precision=%s) in %.2f s",
            model.task, model.version, self.config.freeze, self.config.precision,
            time.perf_counter() - started,
            extra={"task": model.task, "version": model.version},
        )  # fmt: skip


def example_input(shape: tuple[int, ...], n: int = 1) -> np.ndarray:
    """A fixed scan-like batch of `n` (not zeros: a broken conversion can still map zeros right);
    the check of a prepared module here and of a model.onnx at load (service.registry)."""
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0, (n, *shape)).astype(np.float32)
