"""Delivery of results to RESULTS_STOW_URL, kept apart from inference.

A delivery is async I/O on the event loop (service.dicom.stow_client.StowClient): while a PACS is
slow, hangs or is down, the delivery waiting on it holds no worker thread, so inference (which
runs on the worker threads) loses nothing to it. Three bounds keep a bad target from costing more:

* at most RESULTS_STOW_WORKERS deliveries talk to the target at once; the others wait for a slot;
* each delivery has one deadline, RESULTS_STOW_DEADLINE_S from when it was handed over: waiting
  for a slot, connecting, sending, the answer, every retry and its backoff, all within it;
* at most RESULTS_STOW_BACKLOG deliveries wait or run: past it a delivery is refused at once
  (the instance fails with 0x0110, and a new STOW-RS request gets 503 with Retry-After before
  any of its instances is analysed).

Cancelling the task that awaits a delivery (its sender hung up) ends it and closes its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from service import tracing
from service.dicom.stow_client import Delivery, StowClient
from service.metrics import DeliveryMetrics
from service.settings import Settings
from shared import errors as domain

log = logging.getLogger(__name__)


class ResultsBacklogFullError(domain.ServiceOverloadedError):
    """RESULTS_STOW_BACKLOG deliveries are already waiting or running."""


class ResultsDelivery:
    """The bounded delivery lane to one STOW-RS target. Used from the event loop only."""

    def __init__(self, settings: Settings, metrics: DeliveryMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.deadline_s = settings.RESULTS_STOW_DEADLINE_S
        self.backlog_limit = settings.RESULTS_STOW_BACKLOG
        self._outstanding = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: StowClient | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def outstanding(self) -> int:
        """Deliveries waiting for a slot or running."""
        return self._outstanding

    @property
    def full(self) -> bool:
        return self._outstanding >= self.backlog_limit

    def check_capacity(self) -> None:
        """Raises ResultsBacklogFullError (503, Retry-After) when no delivery can be taken."""
        if self.full:
            raise ResultsBacklogFullError(
                f"{self._outstanding} result deliveries to the results target are waiting "
                "(RESULTS_STOW_BACKLOG); retry after the time in the Retry-After header."
            )

    def _bind(self) -> tuple[StowClient, asyncio.Semaphore]:
        """The client and slots of the running loop (made on first use in it)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None or self._slots is None:
            settings = self.settings
            self._loop = loop
            self._client = StowClient(
                settings.RESULTS_STOW_URL,
                username=settings.RESULTS_STOW_USERNAME,
                password=settings.RESULTS_STOW_PASSWORD.get_secret_value(),
                token=settings.RESULTS_STOW_TOKEN.get_secret_value(),
                attempts=settings.RESULTS_STOW_ATTEMPTS,
                try_timeout_s=settings.RESULTS_STOW_TIMEOUT_S,
                deadline_s=settings.RESULTS_STOW_DEADLINE_S,
            )
            self._slots = asyncio.Semaphore(settings.RESULTS_STOW_WORKERS)
        return self._client, self._slots

    async def deliver(self, instances: Sequence[bytes]) -> Delivery:
        """Send the instances within the deadline; never raises but CancelledError."""
        if self.full:
            self.metrics.refused.inc()
            return Delivery(False, 0, "backlog_full")
        client, slots = self._bind()
        deadline = asyncio.get_running_loop().time() + self.deadline_s
        self._outstanding += 1
        self.metrics.backlog.set(self._outstanding)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await slots.acquire()
            except TimeoutError:
                return Delivery(False, 0, "deadline")
            try:
                # a span of its own (no patient data: the count of instances only)
                with tracing.span("results_delivery", **{"busi.instances": len(instances)}):
                    return await client.store(instances, deadline)
            finally:
                slots.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here fails this delivery, nothing else
            log.error("results delivery failed", extra={"error_type": type(exc).__name__})
            return Delivery(False, 0, type(exc).__name__)
        finally:
            self._outstanding -= 1
            self.metrics.backlog.set(self._outstanding)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
