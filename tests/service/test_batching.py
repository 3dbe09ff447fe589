"""service/batching.py: grouping, each request's own result, threads, backpressure, deadlines."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from service_inputs import png

from service.batching import Batcher, BatchingConfig, request_started
from service.metrics import ServiceMetrics
from shared.errors import DeadlineExceededError, ServiceOverloadedError

SHAPE = (3, 8, 8)


class Joint(torch.nn.Module):
    """Deterministic and per-sample: class logits from each image's mean, the mask is 2 x."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return s * torch.tensor([1.0, 2.0, 3.0]), 2.0 * x[:, :1]


class Gated:
    """Wraps a module: records each batch's rows and torch threads, and can hold a forward
    until released, so that requests pile up behind it."""

    def __init__(self, inner: Any, hold: bool = False) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.release.set()
        self.calls: list[tuple[int, int, list[float]]] = []

    def __call__(self, x: torch.Tensor) -> Any:
        self.entered.set()
        assert self.release.wait(10)
        self.calls.append((len(x), torch.get_num_threads(), x[:, 0, 0, 0].tolist()))
        return self.inner(x)


@dataclass(eq=False)
class FakeModel:
    module: Any
    task: str = "diagnosis"
    version: str = "v1"
    input_shape: tuple[int, int, int] = SHAPE
    onnx: Any = None  # a TorchScript model (ONNX forwards: tests/service/test_onnx_runtime.py)

    def runner(self, graph: str = "full") -> Any:
        return self.onnx


def image(value: float) -> np.ndarray:
    return np.full((1, *SHAPE), value, dtype=np.float32)


def batcher(**config: Any) -> tuple[Batcher, ServiceMetrics]:
    metrics = ServiceMetrics()
    values = {"max_batch_size": 4, "threads_alone": 2, "threads_batched": 1, **config}
    made = Batcher(BatchingConfig(**values), metrics, threading.Lock())
    return made, metrics


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_request_gets_its_own_result_when_batched():
    gate = Gated(torch.jit.script(Joint()), hold=True)
    model = FakeModel(gate)
    made, metrics = batcher(max_batch_size=4)
    values = [float(i) for i in range(13)]
    with ThreadPoolExecutor(len(values)) as pool:
        first = pool.submit(made.submit, model, image(values[0]))
        assert gate.entered.wait(10)  # the first forward runs alone and holds the others back
        rest = [pool.submit(made.submit, model, image(v)) for v in values[1:]]
        while len(made._queue) < len(rest):
            time.sleep(0.01)
        gate.release.set()
        results = [first.result(10)] + [f.result(10) for f in rest]
    for value, (classes, mask) in zip(values, results, strict=True):
        np.testing.assert_allclose(classes, [[value, 2 * value, 3 * value]], rtol=1e-6)
        np.testing.assert_allclose(mask, np.full((1, 1, 8, 8), 2 * value), rtol=1e-6)
    rows = [n for n, _, _ in gate.calls]
    assert rows[0] == 1 and max(rows) == 4 and sum(rows) == len(values)
    assert sample(metrics, "busi_batch_size_count", task="diagnosis") == len(rows)
    assert sample(metrics, "busi_batch_size_sum", task="diagnosis") == len(values)
    assert sample(metrics, "busi_queue_wait_seconds_count", task="diagnosis") == len(values)


def test_a_lone_request_runs_at_once_with_every_thread_and_a_batch_with_fewer():
    gate = Gated(torch.jit.script(Joint()), hold=True)
    model = FakeModel(gate)
    made, _ = batcher(max_wait_s=5.0, threads_alone=2, threads_batched=1)
    with ThreadPoolExecutor(4) as pool:
        started = time.perf_counter()
        first = pool.submit(made.submit, model, image(1.0))
        assert gate.entered.wait(10)
        waited = time.perf_counter() - started
        rest = [pool.submit(made.submit, model, image(v)) for v in (2.0, 3.0)]
        while len(made._queue) < 2:
            time.sleep(0.01)
        gate.release.set()
        first.result(10), [f.result(10) for f in rest]
    assert waited < 2.5  # far below MAX_BATCH_WAIT: a lone request does not wait for company
    assert [(n, threads) for n, threads, _ in gate.calls] == [(1, 2), (2, 1)]


def test_batches_hold_only_one_models_requests_oldest_first():
    gate = Gated(torch.jit.script(Joint()), hold=True)
    a, b = FakeModel(gate, task="classification"), FakeModel(gate, task="segmentation")
    made, _ = batcher()
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(made.submit, a, image(0.0))
        assert gate.entered.wait(10)
        futures = []
        for model, value in ((b, 1.0), (a, 2.0), (b, 3.0), (a, 4.0)):
            futures.append(pool.submit(made.submit, model, image(value)))
            while len(made._queue) < len(futures):
                time.sleep(0.01)
        gate.release.set()
        first.result(10), [f.result(10) for f in futures]
    assert [values for _, _, values in gate.calls] == [[0.0], [1.0, 3.0], [2.0, 4.0]]


def test_a_full_queue_refuses_at_once_and_the_queued_requests_still_finish():
    gate = Gated(torch.jit.script(Joint()), hold=True)
    model = FakeModel(gate)
    made, metrics = batcher(max_queue=2)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(made.submit, model, image(0.0))
        assert gate.entered.wait(10)
        queued = [pool.submit(made.submit, model, image(v)) for v in (1.0, 2.0)]
        while len(made._queue) < 2:
            time.sleep(0.01)
        with pytest.raises(ServiceOverloadedError):
            made.submit(model, image(3.0))
        assert sample(metrics, "busi_inference_waiting") == 2
        gate.release.set()
        assert [f.result(10)[0][0, 0] for f in (running, *queued)] == [0.0, 1.0, 2.0]
    assert sample(metrics, "busi_inference_rejected_total", reason="queue_full") == 1
    assert 3.0 not in [v for _, _, values in gate.calls for v in values]


def test_a_request_whose_deadline_passes_in_the_queue_is_never_run():
    gate = Gated(torch.jit.script(Joint()), hold=True)
    model = FakeModel(gate)
    made, metrics = batcher(deadline_s=0.2)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(made.submit, model, image(0.0))
        assert gate.entered.wait(10)
        late = pool.submit(made.submit, model, image(7.0))
        with pytest.raises(DeadlineExceededError):
            late.result(10)
        gate.release.set()
        running.result(10)
    assert [values for _, _, values in gate.calls] == [[0.0]]
    assert sample(metrics, "busi_inference_rejected_total", reason="deadline") == 1
    assert sample(metrics, "busi_inference_waiting") == 0


def test_the_deadline_counts_from_when_the_request_began():
    made, metrics = batcher(deadline_s=0.05)
    request_started.set(time.perf_counter() - 1.0)  # began a second ago
    try:
        with pytest.raises(DeadlineExceededError):
            made.submit(FakeModel(Gated(Joint())), image(1.0))
    finally:
        request_started.set(None)
    assert sample(metrics, "busi_inference_rejected_total", reason="deadline") == 1


def test_a_failed_forward_fails_every_request_of_its_batch_and_the_next_one_runs():
    class Flaky:
        def __init__(self) -> None:
            self.fail = True

        def __call__(self, x: torch.Tensor) -> Any:
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return Joint()(x)

    made, _ = batcher()
    model = FakeModel(Flaky())
    with pytest.raises(RuntimeError, match="boom"):
        made.submit(model, image(1.0))
    classes, _ = made.submit(model, image(2.0))
    assert classes[0, 0] == pytest.approx(2.0)


class Runner:
    """An ONNX Runtime model's runner, as the batcher calls it: records (rows, threads,
    spinning) of each forward; its gate can hold one until released."""

    def __init__(self) -> None:
        self.gate = Gated(Joint())
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(self, x: np.ndarray, threads: int, spinning: bool = False) -> Any:
        self.calls.append((len(x), threads, spinning))
        classes, masks = self.gate(torch.from_numpy(x))
        return classes.numpy(), masks.numpy()


def test_only_a_lone_request_analysed_alone_spins():
    runner = Runner()
    model = FakeModel(None, onnx=runner)
    made, _ = batcher(spin_us=200)
    with made.in_flight:  # the request being analysed alone
        made.submit(model, image(1.0))
    with made.in_flight, made.in_flight:  # another request is being decoded meanwhile
        made.submit(model, image(2.0))
    runner.gate.release.clear()  # a lone forward holds two requests back: they run as a batch
    runner.gate.entered.clear()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(made.submit, model, image(3.0))
        assert runner.gate.entered.wait(10)
        rest = [pool.submit(made.submit, model, image(v)) for v in (4.0, 5.0)]
        while len(made._queue) < 2:
            time.sleep(0.01)
        runner.gate.release.set()
        first.result(10), [f.result(10) for f in rest]
    assert runner.calls == [(1, 2, True), (1, 2, False), (1, 2, True), (2, 1, False)]
    unset, _ = batcher()  # INFERENCE_SPIN_US=0: no forward spins
    with unset.in_flight:
        unset.submit(model, image(6.0))
    assert runner.calls[-1] == (1, 2, False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_frozen_model_serves_the_same_answers(precision):
    module = torch.jit.script(Joint()).eval()
    model = FakeModel(module)
    made, _ = batcher(freeze=True, precision=precision)
    made.served_models = lambda: [model]
    made.prepare_served_models()
    assert made._module_for(model) is not module  # the prepared copy serves
    classes, mask = made.submit(model, image(0.5))
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(classes, [[0.5, 1.0, 1.5]], atol=tolerance)
    np.testing.assert_allclose(mask, np.full((1, 1, 8, 8), 1.0), atol=tolerance)
    assert classes.dtype == np.float32
    made.stop()


# --- through the service -------------------------------------------------------------------


def test_overload_is_a_503_with_retry_after_and_a_deadline_a_504(serve, tiny_model_dir):
    errors = iter([ServiceOverloadedError("busy"), DeadlineExceededError("late")])

    def refuse(model: Any, batch: np.ndarray, graph: str = "full") -> Any:
        raise next(errors)

    def hook(app: Any) -> None:
        app.state.runtime.batcher.submit = refuse

    with serve(tiny_model_dir, app_hook=hook, MAX_QUEUE=3, REQUEST_DEADLINE_MS=500) as client:
        body = png(np.full((64, 64), 128, np.uint8))
        busy = client.post("/classify", content=body, headers={"Content-Type": "image/png"})
        late = client.post("/classify", content=body, headers={"Content-Type": "image/png"})
        metrics = client.get("/metrics").text
    assert busy.status_code == 503
    assert busy.json()["error"]["code"] == "overloaded"
    assert int(busy.headers["Retry-After"]) > 0
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert 'busi_request_failures_total{reason="overloaded"} 1.0' in metrics
    assert 'busi_request_failures_total{reason="deadline_exceeded"} 1.0' in metrics


def test_metrics_show_batch_sizes_and_queue_waits(client):
    body = png(np.full((64, 64), 128, np.uint8))
    assert client.post("/classify", content=body, headers={"Content-Type": "image/png"}).is_success
    text = client.get("/metrics").text
    assert 'busi_batch_size_bucket{le="1.0",task="classification"}' in text
    assert 'busi_queue_wait_seconds_count{task="classification"}' in text
