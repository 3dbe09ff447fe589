"""The results-delivery lane against targets that misbehave: one deadline for the whole delivery
whatever the target does, a bounded backlog, and a cancelled delivery that lets go at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_pacs import FakePacs, wait_until
from prometheus_client import CollectorRegistry

from service.dicom.delivery import ResultsBacklogFullError, ResultsDelivery
from service.dicom.stow_client import StowClient
from service.metrics import DeliveryMetrics
from service.settings import Settings

PAYLOAD = [b"\0" * 1000]


def _store(url: str, **kwargs: float) -> tuple[float, object]:
    async def run() -> object:
        client = StowClient(url, **kwargs)  # type: ignore[arg-type]
        try:
            return await client.store(PAYLOAD)
        finally:
            await client.aclose()

    started = time.perf_counter()
    result = asyncio.run(run())
    return time.perf_counter() - started, result


@pytest.mark.parametrize("mode", ["trickle", "hang", "slow_accept"])
def test_a_slow_target_costs_one_deadline_not_a_timeout_per_read(mode: str) -> None:
    with FakePacs(mode, trickle_s=0.2, accept_delay_s=5) as pacs:
        took, delivery = _store(pacs.url, attempts=3, try_timeout_s=0.6, deadline_s=1.5)
    assert not delivery.delivered  # type: ignore[attr-defined]
    assert delivery.reason in ("deadline", "try_timeout")  # type: ignore[attr-defined]
    assert 1.4 < took < 3.5  # the trickle would go on for 100000 x 0.2 s


def test_a_reset_or_a_500_is_retried_within_the_deadline() -> None:
    with FakePacs("reset") as pacs:
        _, reset = _store(pacs.url, attempts=2, try_timeout_s=5, deadline_s=10)
        assert pacs.requests == 2
    with FakePacs("error500") as pacs:
        _, error = _store(pacs.url, attempts=3, try_timeout_s=5, deadline_s=10)
        assert pacs.requests == 3
    assert not reset.delivered and reset.attempts == 2  # type: ignore[attr-defined]
    assert error.reason == "HTTP 500"  # type: ignore[attr-defined]
    with FakePacs("ok") as pacs:
        _, ok = _store(pacs.url)
    assert ok.delivered  # type: ignore[attr-defined]


def test_no_backoff_is_slept_past_the_deadline() -> None:
    with FakePacs("error500") as pacs:
        took, delivery = _store(pacs.url, attempts=10, try_timeout_s=5, deadline_s=2.0)
        assert pacs.requests == delivery.attempts  # type: ignore[attr-defined]
    # tries at 0, 0.5 and 1.5 s; the next would be at 3.5 s, past the deadline: not slept for
    assert took < 2.2
    assert delivery.reason == "HTTP 500"  # type: ignore[attr-defined]


def _lane(url: str, **overrides: object) -> ResultsDelivery:
    settings = Settings(RESULTS_STOW_URL=url, **overrides)  # type: ignore[arg-type]
    return ResultsDelivery(settings, DeliveryMetrics(CollectorRegistry()))


def test_a_full_backlog_refuses_at_once_and_a_cancelled_delivery_lets_go() -> None:
    with FakePacs("hang") as pacs:
        lane = _lane(pacs.url, RESULTS_STOW_BACKLOG=1, RESULTS_STOW_DEADLINE_S=30)

        async def run() -> tuple[object, float]:
            first = asyncio.create_task(lane.deliver(PAYLOAD))
            while pacs.requests == 0:
                await asyncio.sleep(0.02)
            started = time.perf_counter()
            second = await lane.deliver(PAYLOAD)
            refused_in = time.perf_counter() - started
            with pytest.raises(ResultsBacklogFullError):
                lane.check_capacity()
            first.cancel()  # its sender hung up
            with pytest.raises(asyncio.CancelledError):
                await first
            lane.check_capacity()  # the slot is free again
            await lane.aclose()
            return second, refused_in

        second, refused_in = asyncio.run(run())
        assert not second.delivered and second.reason == "backlog_full"  # type: ignore[attr-defined]
        assert refused_in < 0.1
        assert wait_until(lambda: pacs.open == 0, 2.0), "the connection was not closed"


def test_deliveries_past_the_workers_wait_within_their_own_deadline() -> None:
    with FakePacs("hang") as pacs:
        lane = _lane(pacs.url, RESULTS_STOW_WORKERS=1, RESULTS_STOW_DEADLINE_S=2.0)

        async def run() -> list[object]:
            results = await asyncio.gather(*(lane.deliver(PAYLOAD) for _ in range(3)))
            await lane.aclose()
            return list(results)

        started = time.perf_counter()
        results = asyncio.run(run())
        took = time.perf_counter() - started
        # one slot: the others never reached the target (on a loaded machine even the first
        # may not have been read by the fake PACS before its deadline)
        assert pacs.requests <= 1
    assert [r.reason for r in results] == ["deadline"] * 3  # type: ignore[attr-defined]
    assert took < 4.5  # all three within one deadline, not one after another (6 s)
