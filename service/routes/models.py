"""GET /models/{task}/card: the model card of the version answering a task."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.auth import SCOPE_MODELS, require_scope
from service.card import model_card
from service.deps import AppStateDep
from service.errors import error_response
from service.predictors import DEFAULT_UNCERTAIN_BELOW
from service.schemas import error_responses
from shared.errors import ModelUnavailableError

router = APIRouter(tags=["operations"])


_ERRORS = error_responses(401, 403, 404, 503)
_ERRORS[404] = {
    **_ERRORS[404],
    "description": "No model serves the task here (`not_found`): e.g. diagnosis, where "
    "separate classification and segmentation models answer /diagnose",
}


@router.get(
    "/models/{task}/card",
    response_model=dict[str, Any],
    dependencies=[require_scope(SCOPE_MODELS)],
    responses=_ERRORS,
)
async def model_card_of(
    task: Literal["classification", "segmentation", "diagnosis"],
    app_state: AppStateDep,
    request: Request,
) -> dict[str, Any] | JSONResponse:
    """The model card of the version answering `task`: intended use, training sites and
    scanners, per-site and held-out-site figures, calibration, limitations, the training data's
    licences and citations; blocks its manifest lacks are null and listed in `missing`."""
    registry = app_state.registry
    model = registry.loaded().get(task) or registry.joint()
    if model is None and not registry.ready:
        raise ModelUnavailableError(f"no {task} model is loaded yet; try again later")
    if model is None:  # e.g. diagnosis, answered here by separate classification and segmentation
        message = f"no {task} model is served here; the cards of the models that are: /models"
        return error_response(request.scope, 404, "not_found", message)
    calibration = None
    if model.class_names:
        cal = model.calibration
        below = app_state.settings.UNCERTAIN_BELOW
        below = cal.uncertain_below if below is None else below
        calibration = {
            "calibrated": cal.calibrated,
            "method": cal.method,
            "temperature": cal.temperature,
            "uncertain_below": DEFAULT_UNCERTAIN_BELOW if below is None else below,
            "evaluation": (model.info.metadata.get("metrics") or {}).get("calibration"),
        }
    return model_card(model, calibration)
