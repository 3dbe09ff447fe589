"""The FastAPI application factory. Models load in the lifespan, never at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from service.apidocs import complete_openapi, install_docs
from service.audit import AuditLog
from service.auth import SCOPE_INFER, load_keyring, require_scope
from service.dicom.delivery import ResultsDelivery
from service.errors import install_error_handlers
from service.metrics import DeliveryMetrics
from service.middleware import (
    BodySizeLimitMiddleware,
    BodyTimeoutMiddleware,
    RequestContextMiddleware,
)
from service.registry import ReloadPoller, configure_torch
from service.routes import dicomweb, inference, models, ops, page
from service.schemas import error_responses
from service.settings import Settings, get_settings
from service.state import AppState
from service.tracing import TracingMiddleware, configure_tracing, install_trace_ids

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """\
Classification (normal / benign / malignant) and lesion segmentation of breast-ultrasound
images, from PNG, JPEG or DICOM. **Research use only; not a medical device.**

Every error is `{"error": {"code", "message", "request_id"}}`; `code` is one of the enum of
`ErrorDetail`. Each response carries an `X-Request-ID` header: the client's own if it looks
generated (32-64 hex digits and dashes, at least one a letter: a UUID, a trace id), else a new
one, so that no accession number or patient id can ride into the logs.

**Authentication.** When the service runs with API keys (API_KEYS_FILE, the default of the
container images), send `Authorization: Bearer <key>`. A missing or unknown key is a 401
(`unauthorized`), a key without the endpoint's scope a 403 (`forbidden`). Scopes: `infer`
(/classify, /segment, /diagnose, /dicomweb), `models:read` (/models), `metrics` (/metrics).
/healthz, /readyz, the page and these documents need no key.

Any path answers 404 (`not_found`) when it does not exist and 405 (`method_not_allowed`) for a
method it does not serve. A request whose headers or body arrive too slowly gets 408
(`header_timeout`, `request_timeout`) and its connection is closed.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing is loaded until its lifespan starts."""
    settings = settings or get_settings()
    # Both raise AccessConfigError (the service refuses to start), so before any thread starts.
    keyring = load_keyring(settings.API_KEYS_FILE)
    audit = AuditLog(settings.AUDIT_LOG_FILE) if settings.AUDIT_LOG_FILE else None
    runtime = AppState.from_settings(settings)
    if audit is not None:
        audit.metrics = runtime.metrics
    delivery = None
    if settings.RESULTS_STOW_URL:  # its own lane: a slow PACS holds no inference thread
        delivery = ResultsDelivery(settings, DeliveryMetrics(runtime.metrics.registry))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_torch(settings.TORCH_THREADS)
        install_trace_ids()  # the trace id in each log line written inside a span
        runtime.registry.check_pins()  # a pin to a missing version stops the start-up here
        await anyio.to_thread.run_sync(runtime.registry.refresh)
        # freeze / check the loaded models now, so the first requests get the prepared ones
        await anyio.to_thread.run_sync(runtime.batcher.prepare_served_models)
        if runtime.shadow is not None and await anyio.to_thread.run_sync(runtime.shadow.load):
            runtime.shadow.start()
        if runtime.registry.ready:
            log.info("ready: every model is loaded and warmed up")
        else:
            log.error(
                "not ready: a model is missing or was refused (see above); /readyz answers 503 "
                "until a version passing the gate is promoted in %s (python -m training promote)",
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
            if runtime.shadow is not None:
                runtime.shadow.stop()
            if poller:
                poller.stop()
            if audit is not None:
                audit.close()
            if delivery is not None:
                await delivery.aclose()
            log.info("shut down")

    app = FastAPI(
        title="Breast-ultrasound inference service",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # install_docs: Swagger UI from the app's own files
        redoc_url=None,  # ReDoc would come from a CDN
        # No 307 to the slash-less path: it answered before any key check, with a Location built
        # from the Host header. /diagnose/ is a 404 like any other path that does not exist.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.keyring = keyring
    app.state.audit = audit
    app.state.delivery = delivery
    install_error_handlers(app)
    infer = {"dependencies": [require_scope(SCOPE_INFER)], "responses": error_responses(401, 403)}
    app.include_router(inference.router, **infer)
    app.include_router(dicomweb.router, **infer)
    app.include_router(ops.router)
    app.include_router(models.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR, check_dir=False), name="static")
    install_docs(app)
    complete_openapi(app)
    app.add_middleware(
        BodyTimeoutMiddleware, timeout_s=settings.BODY_TIMEOUT_S, metrics=runtime.metrics
    )
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.MAX_BODY_BYTES)
    # outermost, but for the tracing one
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics, audit=audit)
    if configure_tracing():  # off unless an OpenTelemetry exporter is configured
        app.add_middleware(TracingMiddleware)  # outermost: the request log line is in its span
    return app
