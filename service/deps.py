"""Dependencies of the routes, as Annotated aliases: routes declare what they need."""

from __future__ import annotations

from typing import Annotated, Literal, cast

from fastapi import Depends, Query, Request
from pydantic import Field
from starlette.datastructures import UploadFile

from service.audit import RecordingPredictor
from service.errors import MissingFileError, UnsupportedMediaTypeError
from service.media_types import parse_media_type
from service.predictors import ImageRequest, Predictor
from service.registry import ModelRegistry
from service.state import AppState

# The declared format of each accepted media type; octet-stream (or none) means "sniff".
MEDIA_TYPE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/dicom": "dicom",
}
SNIFFED_MEDIA_TYPES = frozenset({"application/octet-stream", ""})


def _text_part_bytes(value: str) -> bytes:
    """The bytes of a `file` part that arrived as a text field.

    python-multipart ignores an RFC 2231 file name (`filename*=UTF-8''...`, which curl and
    browsers send for non-ASCII names), so such a part reaches us as a text field that Starlette
    decoded as UTF-8, or as Latin-1 when that failed. Both are undone here: bytes that are not
    UTF-8 came through Latin-1 (PNG and JPEG always: their first byte starts no UTF-8 text).
    """
    try:
        latin1 = value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")
    try:
        latin1.decode("utf-8")
    except UnicodeDecodeError:
        return latin1
    return value.encode("utf-8")


# The dependencies below only look things up: `async def` runs them on the event loop. A plain
# `def` would send each to a worker thread and back (FastAPI's threadpool): four round trips per
# image request before its own work starts, and /readyz, /models and /metrics would never answer
# while every worker is held (requests waiting on a hung forward).


async def get_app_state(request: Request) -> AppState:
    return request.app.state.runtime


AppStateDep = Annotated[AppState, Depends(get_app_state)]


async def get_predictor(request: Request, app_state: AppStateDep) -> Predictor:
    """The predictor, recording each input and result for the audit log and the drift metrics."""
    audited = request.app.state.audit is not None
    state = request.scope["state"] if audited else None
    return cast(Predictor, RecordingPredictor(app_state.predictor, app_state.metrics, state))


async def get_registry(app_state: AppStateDep) -> ModelRegistry:
    return app_state.registry


async def get_request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


async def read_image(
    request: Request,
    frame: Annotated[
        Annotated[int, Field(ge=0)] | Literal["all"],
        Query(
            description="Frame of a multi-frame DICOM to analyse (0 = the first), or `all`: "
            "every frame of a cine loop, at most MAX_CINE_FRAMES"
        ),
    ] = 0,
) -> ImageRequest:
    """The image of the request: the multipart field `file`, or else the raw body."""
    media_type = parse_media_type(request.headers.get("content-type")).essence
    if media_type == "multipart/form-data":
        # The body limit already bounds every part; Starlette's own 1 MiB cap on parts without
        # a file name would refuse a `filename*=` upload (see _text_part_bytes).
        max_part = request.app.state.runtime.settings.MAX_BODY_BYTES
        async with request.form(max_files=1, max_fields=4, max_part_size=max_part) as form:
            upload = form.get("file")
            if isinstance(upload, UploadFile):
                data = await upload.read()
                # A part's type comes from the client's file name, so any other type is sniffed.
                declared = MEDIA_TYPE_FORMATS.get(parse_media_type(upload.content_type).essence)
            elif isinstance(upload, str) and upload:
                data, declared = _text_part_bytes(upload), None
            else:
                raise MissingFileError("send the image in the multipart field `file`")
    elif media_type in MEDIA_TYPE_FORMATS or media_type in SNIFFED_MEDIA_TYPES:
        data = await request.body()
        declared = MEDIA_TYPE_FORMATS.get(media_type)
    else:
        raise UnsupportedMediaTypeError(
            "send image/png, image/jpeg, application/dicom, application/octet-stream "
            "or multipart/form-data"
        )
    facts = request.scope["state"].setdefault("log", {})
    return ImageRequest(data=data, declared_format=declared, frame=frame, facts=facts)


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
ImageDep = Annotated[ImageRequest, Depends(read_image)]
