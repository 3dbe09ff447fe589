"""The committed OpenAPI document is the app's, and documents the image media types."""

from __future__ import annotations

import json

from service.openapi import OPENAPI_PATH, render_openapi


def test_committed_openapi_document_is_up_to_date():
    assert OPENAPI_PATH.read_text(encoding="utf-8") == render_openapi(), (
        "openapi/openapi.json is stale; regenerate it with: python -m service.openapi"
    )


def test_image_endpoints_document_every_accepted_media_type():
    document = json.loads(render_openapi())
    for path in ("/classify", "/segment", "/diagnose"):
        operation = document["paths"][path]["post"]
        assert set(operation["requestBody"]["content"]) == {
            "multipart/form-data",
            "image/png",
            "image/jpeg",
            "application/dicom",
            "application/octet-stream",
        }
        assert {"200", "400", "413", "415", "422", "503"} <= set(operation["responses"])
        assert "frame" in {parameter["name"] for parameter in operation["parameters"]}
    assert "image/png" in document["paths"]["/segment"]["post"]["responses"]["200"]["content"]
    schemas = document["components"]["schemas"]
    assert schemas["ClassificationResult"]["properties"]["probabilities"]["examples"]
    assert set(schemas["ErrorDetail"]["properties"]) == {"code", "message", "request_id"}
