"""GET /healthz, /readyz, /models and /metrics: for probes, operators and Prometheus."""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.auth import SCOPE_METRICS, SCOPE_MODELS, require_scope
from service.deps import AppStateDep
from service.metrics import CONTENT_TYPE_LATEST
from service.predictors import DEFAULT_UNCERTAIN_BELOW
from service.schemas import (
    CalibrationDescription,
    HealthResponse,
    ModelDescription,
    ModelsResponse,
    ReadyResponse,
    error_responses,
)
from service.state import AppState

router = APIRouter(tags=["operations"])

# How long /readyz waits for a worker thread before it calls inference stalled.
WORKER_PROBE_S = 0.5


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """Liveness: 200 while the process serves HTTP, models loaded or not."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={
        503: {"model": ReadyResponse, "description": "Not ready, stalled, or shutting down"}
    },
)
async def readyz(request: Request, app_state: AppStateDep) -> JSONResponse:
    """Readiness: 200 only when every model is loaded and warmed up, inference makes progress,
    and no shutdown began. Answered from the event loop within about half a second, whatever the
    worker threads are doing; it shows no versions (/models does, with a key)."""
    loaded = app_state.registry.loaded()
    models = {task: task in loaded for task in app_state.registry.tasks}
    if app_state.draining.is_set():
        status = "shutting_down"
    elif not app_state.registry.ready:
        status = "loading"
    elif await inference_stalled(app_state, request.app.state):
        status = "stalled"
    else:
        status = "ready"
    body = ReadyResponse(status=status, models=models)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


async def inference_stalled(state: AppState, starlette_state: Any) -> bool:
    """Inference has made no progress for READY_STALL_S: a request has waited that long for
    its forward (or one forward has run that long), or no worker thread, which every image
    request needs, has freed up for a WORKER_PROBE_S probe in that long. Both need a stall that
    lasts: a burst that holds every worker for a moment is load, not a stall."""
    stall_s = state.settings.READY_STALL_S
    if state.batcher.stalled_s() > stall_s:
        return True
    now = time.monotonic()
    with anyio.move_on_after(WORKER_PROBE_S):
        await anyio.to_thread.run_sync(_nothing)
        starlette_state.worker_seen = time.monotonic()
        return False
    seen = getattr(starlette_state, "worker_seen", None)
    if seen is None:  # no probe has found a worker yet: the clock starts now
        starlette_state.worker_seen = seen = now
    return now - seen > stall_s


def _nothing() -> None:
    pass


@router.get(
    "/models",
    response_model=ModelsResponse,
    dependencies=[require_scope(SCOPE_MODELS)],
    responses=error_responses(401, 403),
)
async def models(app_state: AppStateDep) -> ModelsResponse:
    """The artifact serving each task: name, version, sha256, metadata and evaluation metrics."""
    loaded = app_state.registry.loaded()
    described: dict[str, ModelDescription | None] = {}
    for task in app_state.registry.tasks:
        model = loaded.get(task)
        if model is None:
            described[task] = None
            continue
        meta = model.info.metadata
        calibration = None
        if model.class_names:
            cal = model.calibration
            below = app_state.settings.UNCERTAIN_BELOW
            below = cal.uncertain_below if below is None else below
            calibration = CalibrationDescription(
                calibrated=cal.calibrated,
                method=cal.method,
                temperature=cal.temperature,
                uncertain_below=DEFAULT_UNCERTAIN_BELOW if below is None else below,
            )
        described[task] = ModelDescription(
            task=task,
            name=model.name,
            version=model.version,
            sha256=model.info.sha256,
            created_at=str(meta["created_at"]),
            architecture=meta.get("architecture"),
            class_names=list(model.class_names) or None,
            input=meta["input"],
            output=meta["output"],
            preprocessing=meta["preprocessing"],
            metrics=meta.get("metrics") or {},
            calibration=calibration,
            intended_use=meta.get("intended_use"),
            runtime=model.runtime,
        )
    registry = app_state.registry
    return ModelsResponse(
        models=described,
        pins=registry.pins(),
        fallback=dict(registry.fallback),
        promoted=registry.promoted(),
        gate=registry.gate.to_dict(),
        gate_refused={task: dict(v) for task, v in registry.gate_refused.items() if v},
    )


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[require_scope(SCOPE_METRICS)],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        **error_responses(401, 403),
    },
)
async def metrics(app_state: AppStateDep) -> Response:
    """Prometheus exposition: latencies per endpoint and stage, failures, model versions, served
    labels, the process."""
    return Response(app_state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
