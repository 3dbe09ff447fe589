"""What a hospital security review looks for: headers on every answer, no redirect that answers
before the key check, no versions without a key, one Authorization header, a client address that
cannot be forged, no server banner."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_inputs import png

from service.__main__ import uvicorn_config
from service.app import create_app
from service.auth import keys_file_line
from service.keys import new_key
from service.middleware import PAGE_CSP


def _png(client: TestClient, path: str = "/classify", headers=None):  # noqa: ANN001, ANN202
    return client.post(path, content=png(), headers=headers or {"Content-Type": "image/png"})


def test_inference_answers_are_not_sniffed_framed_or_stored(client) -> None:
    for response in (_png(client), client.post("/classify", content=b"x")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "server" not in response.headers


def test_the_page_has_a_content_security_policy_and_cannot_be_framed(client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["Content-Security-Policy"] == PAGE_CSP
    assert "frame-ancestors 'none'" in PAGE_CSP and "default-src 'self'" in PAGE_CSP
    assert page.headers["X-Frame-Options"] == "DENY"
    docs = client.get("/docs")
    assert "frame-ancestors 'none'" in docs.headers["Content-Security-Policy"]
    script = client.get("/static/app.js")
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    assert script.headers.get("Cache-Control") != "no-store"  # the page's own files may cache


@pytest.mark.parametrize("path", ["/diagnose/", "/classify/", "/dicomweb/studies/"])
def test_a_trailing_slash_is_404_not_a_redirect_built_from_the_host(client, path: str) -> None:
    response = client.post(
        path, content=png(), headers={"Content-Type": "image/png", "Host": "evil.example"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "location" not in response.headers


def test_readyz_shows_no_version(client) -> None:
    body = client.get("/readyz").json()
    assert body == {"status": "ready", "models": body["models"]}
    assert all(isinstance(v, bool) for v in body["models"].values())


def test_two_authorization_headers_are_refused_whichever_comes_first(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from conftest import make_settings

    key = new_key()
    keys = tmp_path / "api_keys"
    keys.write_text(keys_file_line("clinic", ("infer",), key) + "\n")
    app = create_app(make_settings(tiny_model_dir, API_KEYS_FILE=keys))
    good, bad = ("Authorization", f"Bearer {key}"), ("Authorization", "Bearer nonsense")
    with TestClient(app) as client:
        assert _png(client, headers=[("Content-Type", "image/png"), good]).status_code == 200
        for pair in ([good, bad], [bad, good], [good, good]):
            response = _png(client, headers=[("Content-Type", "image/png"), *pair])
            assert response.status_code == 401
            assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


def test_forwarded_addresses_are_believed_only_from_the_configured_proxies(
    tiny_model_dir: Path,
) -> None:
    from conftest import make_settings

    closed = uvicorn_config(
        create_app(make_settings(tiny_model_dir)), make_settings(tiny_model_dir)
    )
    assert closed.proxy_headers is False and closed.server_header is False
    settings = make_settings(tiny_model_dir, FORWARDED_ALLOW_IPS="10.0.0.7")
    opened = uvicorn_config(create_app(settings), settings)
    assert opened.proxy_headers is True and opened.forwarded_allow_ips == "10.0.0.7"
