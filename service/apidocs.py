"""The API's documents: Swagger UI served by the app itself (no CDN: it must work inside a hospital
network), and what the generated OpenAPI document cannot know by itself: the error-code enum,
the response headers every operation shares, and the 404 / 405 every path can answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from service.errors import error_codes

SWAGGER_UI_PREFIX = "/docs-assets"

_STRING = {"type": "string"}
REQUEST_ID_HEADER = {
    "description": "The request's id, also in every log line and error body: the client's own "
    "X-Request-ID if it looks generated (32-64 hex digits and dashes, e.g. a UUID), else a new "
    "one",
    "schema": _STRING,
}
RETRY_AFTER_HEADER = {"description": "Seconds to wait before retrying", "schema": _STRING}
AUTHENTICATE_HEADER = {
    "description": 'RFC 6750: `Bearer realm="busi"`, with `error="invalid_token"` or '
    '`error="insufficient_scope", scope="<scope>"`',
    "schema": _STRING,
}
MODEL_HEADERS = {
    "X-Model-Name": {
        "description": "Name of the model that produced the result",
        "schema": _STRING,
    },
    "X-Model-Version": {"description": "Version of that model", "schema": _STRING},
}
COMMON_RESPONSES = {
    "NotFound": {"description": "No such path (`not_found`)"},
    "MethodNotAllowed": {"description": "The path exists, not with this method"},
}


def install_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI from the swagger-ui-bundle package's files, served at /docs-assets."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(
        SWAGGER_UI_PREFIX,
        StaticFiles(directory=str(swagger_ui_path)),
        name="docs-assets",
    )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets = f"{root}{SWAGGER_UI_PREFIX}"
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API documentation",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
        )


def complete_openapi(app: FastAPI) -> None:
    """Make app.openapi() add the codes, headers and shared responses to the generated document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        _complete(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {})
    detail = components.get("schemas", {}).get("ErrorDetail")
    if detail:
        detail["properties"]["code"]["enum"] = error_codes()
    components.setdefault("responses", {}).update(
        {
            name: {
                **response,
                "headers": {"X-Request-ID": REQUEST_ID_HEADER},
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                },
            }
            for name, response in COMMON_RESPONSES.items()
        }
    )
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            for status, response in responses.items():
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = REQUEST_ID_HEADER
                if status == "503":
                    headers["Retry-After"] = RETRY_AFTER_HEADER
                if status in ("401", "403"):
                    headers["WWW-Authenticate"] = AUTHENTICATE_HEADER
                if status == "200" and "image/png" in response.get("content", {}):
                    for name, header in MODEL_HEADERS.items():
                        headers.setdefault(name, header)
