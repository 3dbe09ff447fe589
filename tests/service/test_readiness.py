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
        assert took < 1.5
        for thread in waiting:
            thread.join(30)
        assert answers == [200, 200, 200]  # the forward went on once it could
        assert wait_until(lambda: client.get("/readyz").status_code == 200, 5)


def test_readyz_answers_stalled_when_no_worker_thread_frees_up(serve, tiny_model_dir: Path) -> None:
    """Every worker thread held (by requests waiting on a hung forward): /readyz, which needs
    none, still answers, and says so."""
    import anyio.to_thread

    with serve(tiny_model_dir, READY_STALL_S=600) as client:  # the batcher's clock: out of play
        portal = client.portal  # type: ignore[attr-defined]
        limiter = portal.call(anyio.to_thread.current_default_thread_limiter)
        saved = limiter.total_tokens
        portal.call(setattr, limiter, "total_tokens", 2)
        lock = client.app.state.runtime.registry.inference_lock  # type: ignore[attr-defined]
        try:
            with lock:
                waiting = [
                    threading.Thread(
                        target=client.post,
                        args=("/classify",),
                        kwargs={"content": png(), "headers": {"Content-Type": "image/png"}},
                    )
                    for _ in range(2)
                ]
                for thread in waiting:
                    thread.start()
                assert wait_until(lambda: limiter.borrowed_tokens == 2, 5)
                started = time.perf_counter()
                ready = client.get("/readyz")
                took = time.perf_counter() - started
            for thread in waiting:
                thread.join(30)
        finally:
            portal.call(setattr, limiter, "total_tokens", saved)
        assert ready.status_code == 503 and ready.json()["status"] == "stalled"
        assert took < 2.0
        assert client.get("/readyz").status_code == 200
