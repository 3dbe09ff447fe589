"""Readiness that means it: /readyz answers from the event loop within its budget whatever the
workers are doing, and says 503 `stalled` when inference makes no progress; /healthz stays 200."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fake_pacs import wait_until
from service_inputs import png


def test_a_hung_forward_turns_readyz_stalled_within_its_budget(serve, tiny_model_dir: Path) -> None:
    with serve(tiny_model_dir, READY_STALL_S=0.5) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        lock = client.app.state.runtime.registry.inference_lock  # type: ignore[attr-defined]
        answers: list[int] = []

        def classify() -> None:
            response = client.post(
                "/classify", content=png(), headers={"Content-Type": "image/png"}
            )
            answers.append(response.status_code)

        with lock:  # what every forward takes: as if one hung
            waiting = [threading.Thread(target=classify) for _ in range(3)]
            for thread in waiting:
                thread.start()
            time.sleep(0.7)
            started = time.perf_counter()
            ready = client.get("/readyz")
            took = time.perf_counter() - started
            assert client.get("/healthz").status_code == 200  # liveness stays cheap
        assert ready.status_code == 503
        assert ready.json()["status"] == "stalled"
        assert took < 2.5  # generous for a loaded machine: it waited for nothing
        for thread in waiting:
            thread.join(30)
        assert answers == [200, 200, 200]  # the forward went on once it could
        assert wait_until(lambda: client.get("/readyz").status_code == 200, 5)


def test_readyz_says_stalled_once_no_worker_thread_has_freed_up_for_the_stall_time(
    serve, tiny_model_dir: Path
) -> None:
    """Every worker thread held (as by requests stuck in a decode): /readyz, which needs none,
    still answers; a moment of it is load, READY_STALL_S of it a stall."""
    import anyio.to_thread

    with serve(tiny_model_dir, READY_STALL_S=1.5) as client:
        assert client.get("/readyz").status_code == 200  # a worker seen now
        portal = client.portal  # type: ignore[attr-defined]
        limiter = portal.call(anyio.to_thread.current_default_thread_limiter)
        release = threading.Event()
        held = [
            portal.start_task_soon(anyio.to_thread.run_sync, release.wait)
            for _ in range(int(limiter.total_tokens))
        ]
        try:
            assert wait_until(lambda: limiter.borrowed_tokens == limiter.total_tokens, 10)
            started = time.perf_counter()
            early = client.get("/readyz")
            took = time.perf_counter() - started
            time.sleep(1.5)
            late = client.get("/readyz")
            assert client.get("/healthz").status_code == 200
        finally:
            release.set()
            for future in held:
                future.result(10)
        assert early.status_code == 200  # held for a moment: load, not a stall
        assert took < 2.0  # the probe waited its half second and no more (a loaded machine)
        assert late.status_code == 503 and late.json()["status"] == "stalled"
        assert client.get("/readyz").status_code == 200
