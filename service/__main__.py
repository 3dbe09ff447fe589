"""`python -m service`: serve the app with uvicorn, one worker, settings from the environment."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from service.app import create_app
from service.logs import configure_logging
from service.settings import get_settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT /readyz turns 503 before anything else happens."""

    def __init__(self, config: uvicorn.Config, draining: threading.Event) -> None:
        super().__init__(config)
        self.draining = draining

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.draining.set()
        super().handle_exit(sig, frame)


def main() -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.HOST,
        port=settings.PORT,
        workers=1,
        lifespan="on",
        access_log=False,  # the service logs each request itself, without patient data
        log_config=None,
        timeout_graceful_shutdown=int(settings.GRACEFUL_SHUTDOWN_S),
    )
    log.info(
        "starting on %s:%d with %d torch threads",
        settings.HOST, settings.PORT, settings.TORCH_THREADS,
        extra={"model_dir": str(settings.MODEL_DIR)},
    )  # fmt: skip
    DrainingServer(config, app.state.runtime.draining).run()


if __name__ == "__main__":
    main()
