"""GET /models/{task}/card: the model card of the version answering a task."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter

from service.auth import SCOPE_MODELS, require_scope
from service.card import model_card
from service.deps import RuntimeDep
from service.predictors import DEFAULT_UNCERTAIN_BELOW
from service.schemas import error_responses
from shared.errors import ModelUnavailableError

router = APIRouter(tags=["operations"])


@router.get(
    "/models/{task}/card",
    dependencies=[require_scope(SCOPE_MODELS)],
    responses=error_responses(401, 403, 503),
)
async def model_card_of(
    task: Literal["classification", "segmentation", "diagnosis"], runtime: RuntimeDep
) -> dict[str, Any]:
    """The model card of the version answering `task`: intended use, training sites and
    scanners, per-site and held-out-site figures, calibration, limitations, the training data's
    licences and citations; blocks its manifest lacks are null and listed in `missing`."""
    registry = runtime.registry
    model = registry.loaded().get(task) or registry.joint()
    if model is None:
        raise ModelUnavailableError(f"no {task} model is loaded yet; try again later")
    calibration = None
    if model.class_names:
        cal = model.calibration
        below = runtime.settings.UNCERTAIN_BELOW
        below = cal.uncertain_below if below is None else below
        calibration = {
            "calibrated": cal.calibrated,
            "method": cal.method,
            "temperature": cal.temperature,
            "uncertain_below": DEFAULT_UNCERTAIN_BELOW if below is None else below,
            "evaluation": (model.info.metadata.get("metrics") or {}).get("calibration"),
        }
    return model_card(model, calibration)
