"""The FastAPI application factory. Models load in the lifespan, never at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from service.errors import install_error_handlers
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.registry import ReloadPoller, configure_torch
from service.routes import dicomweb, inference, ops, page
from service.runtime import Runtime
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """\
Classification (normal / benign / malignant) and lesion segmentation of breast-ultrasound
images, from PNG, JPEG or DICOM. **Research use only; not a medical device.**

Every error is `{"error": {"code", "message", "request_id"}}`. Each response carries an
`X-Request-ID` header (the client's own, if it sent a short token of letters, digits, `.`, `_`
or `-`).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing is loaded until its lifespan starts."""
    settings = settings or get_settings()
    runtime = Runtime.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch(settings.TORCH_THREADS)
        runtime.registry.check_pins()  # a pin to a missing version stops the start-up here
        await anyio.to_thread.run_sync(runtime.registry.refresh)
        # freeze / check the loaded models now, so the first requests get the prepared ones
        await anyio.to_thread.run_sync(runtime.batcher.prepare_served_models)
        if runtime.registry.ready:
            log.info("ready: every model is loaded and warmed up")
        else:
            log.error(
                "not ready: a model is missing or was refused (see above); /readyz answers 503 "
                "until a verified version is published in %s",
                settings.MODEL_DIR,
            )
        poller = None
        if settings.RELOAD_INTERVAL_S > 0:
            poller = ReloadPoller(runtime.registry, settings.RELOAD_INTERVAL_S)
            poller.start()
        try:
            yield
        finally:
            runtime.draining.set()
            runtime.batcher.stop()  # after the last request: uvicorn drained them before this
            if poller:
                poller.stop()
            log.info("shut down")

    app = FastAPI(
        title="Breast-ultrasound inference service",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(dicomweb.router)
    app.include_router(ops.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR, check_dir=False), name="static")
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.MAX_BODY_BYTES)
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics)  # outermost
    return app
