"""A client that goes away mid-upload is a client abort (499 in logs and metrics), never a 500."""

from __future__ import annotations

import logging

import anyio
import pytest
from service_inputs import png

from service.app import create_app
from service.settings import Settings


def _scope(content_type: bytes, length: int) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", content_type), (b"content-length", str(length).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def _abort_mid_upload(app, content_type: bytes, first_chunk: bytes) -> list[dict]:
    """Send `first_chunk` of a longer body, then the client disconnects; return what was sent."""
    messages = [{"type": "http.request", "body": first_chunk, "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    anyio.run(app, _scope(content_type, len(first_chunk) * 4), receive, send)
    return sent


@pytest.mark.parametrize(
    ("content_type", "chunk"),
    [
        (b"image/png", png()[:100]),
        (
            b"multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png()[:100],
        ),
    ],
    ids=["raw-body", "multipart"],
)
def test_client_disconnect_mid_upload_is_a_client_abort(
    tiny_model_dir, caplog, content_type, chunk
):
    app = create_app(Settings(MODEL_DIR=tiny_model_dir, RELOAD_INTERVAL_S=0, TORCH_THREADS=1))
    with caplog.at_level(logging.INFO):
        sent = _abort_mid_upload(app, content_type, chunk)
    assert not [m for m in sent if m["type"] == "http.response.start"]  # nobody to answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    (access,) = [r for r in caplog.records if r.name == "service.access"]
    assert (access.status, access.error_code, access.levelno) == (
        499,
        "client_disconnected",
        logging.INFO,
    )
    metrics = app.state.runtime.metrics.exposition().decode()
    assert 'busi_request_failures_total{reason="client_disconnected"} 1.0' in metrics
    assert 'status="499"' in metrics and 'status="500"' not in metrics
