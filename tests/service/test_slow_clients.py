"""Slow clients cannot hold the service: 400 slowloris connections are open, and a normal request
is still served; each of them is then answered 408 and closed once HEADER_TIMEOUT_S has passed,
trickling or not; a stalled body is answered 408 after BODY_TIMEOUT_S.

Real sockets against a real `python -m service` on loopback (tests/service_process.py).
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest
from service_inputs import png
from service_process import QUIET_ENV, running_service

pytestmark = pytest.mark.slow

SLOW_CONNECTIONS = 400
HEADER_TIMEOUT_S = 10.0  # long enough for the normal request on a busy machine
BODY_TIMEOUT_S = 3.0


def _closed_with(sock: socket.socket) -> bytes | None:
    """What the server sent before closing `sock`, or None while it is still open and silent."""
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except BlockingIOError:
        return None if not data else data  # data but no close yet: read it again later
    return data or b"<closed>"


def _metric(text: str, name: str, phase: str) -> float:
    match = re.search(rf'^{name}\{{phase="{phase}"\}} (\S+)$', text, flags=re.MULTILINE)
    return float(match[1]) if match else 0.0


def test_slowloris_connections_neither_block_a_request_nor_stay_open(tmp_path, tiny_model_dir):
    env = {
        **QUIET_ENV,
        "MODEL_DIR": str(tiny_model_dir),
        "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "MAX_CONNECTIONS": "500",
        "LOG_LEVEL": "WARNING",
    }
    with running_service(env, tmp_path / "service.log", timeout_s=300) as service:
        address = ("127.0.0.1", service.port)
        started = time.monotonic()
        slow = []
        for i in range(SLOW_CONNECTIONS):
            sock = socket.create_connection(address, timeout=5)
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
            slow.append(sock)

        # A stalled body: complete headers, 10 of the 100 bytes it declares.
        stalled = socket.create_connection(address, timeout=5)
        stalled.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100\r\n\r\n" + png()[:10]
        )

        with httpx.Client(base_url=service.url, timeout=30) as client:
            response = client.post(
                "/classify", content=png(), headers={"Content-Type": "image/png"}
            )
            served_after = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert response.json()["label"] in ("normal", "benign", "malignant")
            still_open = sum(_closed_with(sock) is None for sock in slow)
            assert served_after < HEADER_TIMEOUT_S
            assert still_open == SLOW_CONNECTIONS, "served while every slow connection was open"

            # Trickling a byte a second does not keep a connection: the header deadline counts
            # from the connection's start.
            answers: dict[int, bytes] = {}
            deadline = started + HEADER_TIMEOUT_S + 30
            while len(answers) < SLOW_CONNECTIONS and time.monotonic() < deadline:
                for i, sock in enumerate(slow):
                    if i in answers:
                        continue
                    answer = _closed_with(sock)
                    if answer is not None:
                        answers[i] = answer
                    elif time.monotonic() < started + HEADER_TIMEOUT_S - 2:
                        sock.send(b"a")  # (not near the deadline: no write after the close)
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            assert len(answers) == SLOW_CONNECTIONS, f"{len(answers)} closed in {elapsed:.0f} s"
            assert elapsed >= HEADER_TIMEOUT_S - 1
            timed_out = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408 ")]
            assert len(timed_out) == SLOW_CONNECTIONS
            body = json.loads(timed_out[0].split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == "header_timeout"

            stalled_answer = _closed_with(stalled)
            assert stalled_answer is not None and stalled_answer.startswith(b"HTTP/1.1 408 ")
            body = json.loads(stalled_answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == "request_timeout"

            # the service still serves, and counted what it refused
            assert client.get("/readyz").status_code == 200
            metrics = client.get("/metrics").text
            name = "busi_slow_client_timeouts_total"
            assert _metric(metrics, name, "headers") == SLOW_CONNECTIONS
            assert _metric(metrics, name, "body") == 1
        for sock in [*slow, stalled]:
            sock.close()


def _noise_png(side: int = 420) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _exchange(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(request)  # one write: the server reads headers and body together
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: (\d+)", head)
                if length and len(body) >= int(length[1]):
                    break
        return data


def test_the_header_cap_counts_header_bytes_not_the_body_read_with_them(tmp_path, tiny_model_dir):
    env = {**QUIET_ENV, "MODEL_DIR": str(tiny_model_dir), "LOG_LEVEL": "WARNING"}
    image = _noise_png()
    assert len(image) > 2 * 64 * 1024
    with running_service(env, tmp_path / "service.log", timeout_s=300) as service:
        address = ("127.0.0.1", service.port)
        head = (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(image)
        )
        answer = _exchange(address, head + image)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (80 * 1024) + b"\r\n\r\n"
        answer = _exchange(address, huge)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_uvicorn_runs_with_the_connection_cap_and_the_guarded_protocol(tiny_model_dir):
    from service.__main__ import uvicorn_config
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(MODEL_DIR=tiny_model_dir, MAX_CONNECTIONS=123, HEADER_TIMEOUT_S=7)
    config = uvicorn_config(create_app(settings), settings)
    assert config.limit_concurrency == 123
    assert config.http.__name__ == "GuardedHttpToolsProtocol"


def test_past_max_connections_the_answer_is_the_json_envelope_with_retry_after(
    tmp_path, tiny_model_dir
):
    env = {**QUIET_ENV, "MODEL_DIR": str(tiny_model_dir), "MAX_CONNECTIONS": "3"}
    env.update(HEADER_TIMEOUT_S="30", LOG_LEVEL="WARNING")
    with running_service(env, tmp_path / "service.log", timeout_s=300) as service:
        address = ("127.0.0.1", service.port)
        held = [socket.create_connection(address, timeout=5) for _ in range(3)]
        time.sleep(0.5)  # the server has accepted them
        extra = socket.create_connection(address, timeout=10)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := extra.recv(65536):
            answer += chunk
        extra.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        assert headers[b"content-type"] == b"application/json"
        assert headers[b"retry-after"] == b"1"
        assert json.loads(body)["error"]["code"] == "overloaded"
        for sock in held:
            sock.close()
        time.sleep(0.5)
        with httpx.Client(base_url=service.url, timeout=30) as client:
            assert client.get("/healthz").status_code == 200  # the cap frees with the connections
            metrics = client.get("/metrics").text
        assert _metric_reason(metrics, "busi_inference_rejected_total", "connection_limit") == 1
        assert _metric_reason(metrics, "busi_request_failures_total", "overloaded") == 1


def _metric_reason(text: str, name: str, reason: str) -> float:
    match = re.search(rf'^{name}\{{reason="{reason}"\}} (\S+)$', text, flags=re.MULTILINE)
    return float(match[1]) if match else 0.0
