"""`python -m service`: starts without models, and drains gracefully on SIGTERM."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_inputs import png

from service.__main__ import DrainingServer
from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model_dir: Path, log_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environment = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "PORT": str(port),
        "TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "RELOAD_INTERVAL_S": "0",
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, port


def get(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def wait_until_serving(process: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            get(port, "/healthz")
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(log_path.read_text())


def test_signal_hook_turns_readiness_off_before_uvicorn_shuts_down(serve, tiny_model_dir):
    import uvicorn

    with serve(tiny_model_dir) as client:
        runtime = client.app.state.runtime
        server = DrainingServer(uvicorn.Config(client.app), runtime.draining)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        assert client.get("/readyz").status_code == 503


@pytest.mark.slow
def test_service_without_models_starts_not_ready(tmp_path):
    log_path = tmp_path / "service.log"
    process, port = start_service(tmp_path / "empty", log_path)
    try:
        wait_until_serving(process, port, log_path)
        assert get(port, "/healthz") == 200
        assert get(port, "/readyz") == 503
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "no usable classification model" in log_path.read_text()


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_exits(tmp_path, publish_tiny):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(tmp_path, TASK_SEGMENTATION, "v1")
    log_path = tmp_path / "service.log"
    process, port = start_service(tmp_path, log_path, GRACEFUL_SHUTDOWN_S="10")
    try:
        wait_until_serving(process, port, log_path)
        assert get(port, "/readyz") == 200

        # A request in flight: headers and half of the body sent when SIGTERM arrives.
        body = png()
        half = len(body) // 2
        in_flight = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        in_flight.putrequest("POST", "/classify")
        in_flight.putheader("Content-Type", "image/png")
        in_flight.putheader("Content-Length", str(len(body)))
        in_flight.endheaders(body[:half])
        time.sleep(0.3)

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # new connections are refused
            get(port, "/readyz")

        in_flight.send(body[half:])
        response = in_flight.getresponse()
        assert response.status == 200
        assert b'"label"' in response.read()
        # uvicorn re-raises the signal once drained, so the exit status reports SIGTERM.
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert '"message": "shut down"' in log
