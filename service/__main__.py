"""`python -m service`: serve the app with uvicorn, one worker, settings from the environment."""

from __future__ import annotations

import logging
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.auth import AccessConfigError, check_open_access, load_keyring
from service.connections import guarded_protocol
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.settings import Settings, get_settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT /readyz turns 503 before anything else happens."""

    def __init__(self, config: uvicorn.Config, draining: threading.Event) -> None:
        super().__init__(config)
        self.draining = draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.draining.set()
        super().handle_exit(sig, frame)


def _count_capacity_refusal(metrics: ServiceMetrics) -> None:
    metrics.failures.labels("overloaded").inc()
    metrics.inference_rejected.labels("connection_limit").inc()


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings: one worker, no access log of its own, and the slow-client guards."""
    metrics = app.state.runtime.metrics
    return uvicorn.Config(
        app,
        host=settings.HOST,
        port=settings.PORT,
        workers=1,
        lifespan="on",
        access_log=False,  # the service logs each request itself, without patient data
        log_config=None,
        timeout_graceful_shutdown=int(settings.GRACEFUL_SHUTDOWN_S),
        # HEADER_TIMEOUT_S and the header size cap (service.connections); beyond MAX_CONNECTIONS
        # open connections or requests in flight, 503 `overloaded` with Retry-After.
        http=guarded_protocol(
            settings.HEADER_TIMEOUT_S,
            lambda phase: metrics.slow_client_timeouts.labels(phase).inc(),
            lambda: _count_capacity_refusal(metrics),
        ),
        limit_concurrency=settings.MAX_CONNECTIONS,
        server_header=False,  # no `server: uvicorn`: the version of nothing is anyone's business
        # X-Forwarded-For is believed only from FORWARDED_ALLOW_IPS (none by default), so the
        # audit log's client address cannot be forged by whoever reaches the port.
        proxy_headers=bool(settings.FORWARDED_ALLOW_IPS),
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS or None,
    )


def main() -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    try:
        check_open_access(
            settings.HOST, load_keyring(settings.API_KEYS_FILE), settings.ALLOW_OPEN_ACCESS
        )
        from service.app import create_app  # torch and the rest: only once access is settled

        app = create_app(settings)
    except AccessConfigError as exc:
        log.critical("not starting: %s", exc)
        sys.exit(2)
    config = uvicorn_config(app, settings)
    log.info(
        "starting on %s:%d with %d torch threads",
        settings.HOST, settings.PORT, settings.TORCH_THREADS,
        extra={"model_dir": str(settings.MODEL_DIR)},
    )  # fmt: skip
    DrainingServer(config, app.state.runtime.draining).run()


if __name__ == "__main__":
    main()
