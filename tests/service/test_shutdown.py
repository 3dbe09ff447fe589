"""`python -m service` starts without models; SIGTERM turns readiness off before uvicorn stops.

The drain itself (in-flight requests finish, new connections are refused, the process exits within
GRACEFUL_SHUTDOWN_S) is tested end to end in tests/deploy/test_graceful_shutdown.py.
"""

from __future__ import annotations

import signal

import httpx
import pytest
from service_process import QUIET_ENV, ServiceProcess

from service.__main__ import DrainingServer


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
    env = {"MODEL_DIR": str(tmp_path / "empty"), **QUIET_ENV}
    with ServiceProcess(env, tmp_path / "service.log") as service:
        service.wait_for("/healthz")
        assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{service.url}/readyz", timeout=5).status_code == 503
        status = service.stop(timeout_s=30)
    assert status != -signal.SIGKILL, "the service did not exit within 30 s of SIGTERM"
    assert "no promotions.json in" in service.log_path.read_text()  # nothing is promoted
