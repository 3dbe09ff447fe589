"""/docs works offline (Swagger UI from the app, no CDN) and the OpenAPI document names the error
codes, the auth errors and the response headers."""

from __future__ import annotations

import re

from service.errors import error_codes


def test_docs_page_loads_swagger_ui_from_the_app_only(client):
    response = client.get("/docs")
    assert response.status_code == 200
    html = response.text
    external = re.findall(r"""(?:src|href)\s*=\s*["'](https?:)?//""", html)
    assert external == [], "the docs page must not load anything from another host"
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    for asset in assets:
        loaded = client.get(asset)
        assert loaded.status_code == 200, asset
        assert len(loaded.content) > 100
    assert "url: '/openapi.json'" in html or '"/openapi.json"' in html
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN


def test_error_codes_are_an_enum_and_auth_errors_are_documented(client):
    document = client.get("/openapi.json").json()
    code = document["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert code["enum"] == error_codes()
    assert {"unauthorized", "forbidden", "request_timeout", "not_found"} <= set(code["enum"])
    scheme = document["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, method in [("/classify", "post"), ("/models", "get"), ("/metrics", "get")]:
        operation = document["paths"][path][method]
        assert operation["security"] == [{"ApiKey": []}], path
        assert {"401", "403"} <= set(operation["responses"]), path
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    for path in ("/healthz", "/readyz"):
        assert "security" not in document["paths"][path]["get"]


def test_response_headers_are_documented(client):
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response.get("headers", {}), (path, method, status)
                if status == "503":
                    assert "Retry-After" in response["headers"], (path, method)
    png_200 = document["paths"]["/segment"]["post"]["responses"]["200"]["headers"]
    assert {"X-Model-Name", "X-Model-Version"} <= set(png_200)
